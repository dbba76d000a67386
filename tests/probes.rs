//! The two ΔS probes and retrieval coverage on real human-written text (the Python FAQ set of
//! tests/fixtures): how well each separates grounded exchanges from ungrounded answers and wrong
//! retrievals, with the default `hashed` embedder and with `local` when its model is there.

mod common;

use common::corpus::{self, auc, exchange, quantile, Item, Pairing};
use driftguard::config::{EmbedderKind, Signals};
use driftguard::eval::Evaluator;
use driftguard::signals::embed::Hashed;
use driftguard::signals::extract::Extracted;
use driftguard::signals::measure;
use driftguard::signals::retrieval::DocFrequency;
use std::sync::Mutex;

struct Scores {
    qr: Vec<f64>,
    ra: Vec<f64>,
    max: Vec<f64>,
    coverage: Vec<f64>,
    retrieval_coverage: Vec<f64>,
}

fn score(evaluator: &Evaluator, items: &[Item], pairing: Pairing) -> Scores {
    let mut s = Scores {
        qr: vec![],
        ra: vec![],
        max: vec![],
        coverage: vec![],
        retrieval_coverage: vec![],
    };
    let df = Mutex::new(DocFrequency::new());
    for i in 0..items.len() {
        let x = exchange(items, i, pairing);
        let extracted = Extracted {
            question: Some(x.question.to_string()),
            chunks: x.chunks.to_vec(),
            answer: Some(x.answer.to_string()),
            ..Extracted::default()
        };
        let scored = evaluator.score(&extracted, &df).expect("scored");
        s.retrieval_coverage
            .push(scored.retrieval_coverage.unwrap_or(0.0));
        s.qr.push(scored.delta_s_qr);
        s.ra.push(scored.delta_s_ra);
        s.max.push(scored.delta_s);
        s.coverage.push(scored.coverage.unwrap_or(0.0));
    }
    s
}

fn evaluator(kind: EmbedderKind) -> Option<Evaluator> {
    let mut signals = Signals {
        embedder: kind,
        ..Signals::default()
    };
    if kind == EmbedderKind::Local {
        signals.local.model_dir = corpus::model_dir()?.display().to_string();
    }
    Some(Evaluator::from_config(&signals).expect("evaluator"))
}

fn line(name: &str, good: &[f64], bad: &[f64]) -> String {
    format!(
        "{name:<12} AUC {:.3}  good p50 {:.3} p95 {:.3}  bad p50 {:.3} p95 {:.3} p5 {:.3}",
        auc(good, bad),
        quantile(good, 0.5),
        quantile(good, 0.95),
        quantile(bad, 0.5),
        quantile(bad, 0.95),
        quantile(bad, 0.05),
    )
}

/// The `hashed` probes before calibration (the raw lexical ΔS).
fn raw_hashed(items: &[Item], pairing: Pairing) -> (Vec<f64>, Vec<f64>) {
    let h = Hashed;
    (0..items.len())
        .map(|i| {
            let x = exchange(items, i, pairing);
            let chunks: Vec<Vec<f32>> = x.chunks.iter().map(|c| h.vector(c)).collect();
            let d = measure::delta_s_probes(&h.vector(x.question), &chunks, &h.vector(x.answer));
            (d.qr, d.ra)
        })
        .unzip()
}

#[test]
fn separation_report() {
    let items = corpus::items();
    let (gq, ga) = raw_hashed(&items, Pairing::Grounded);
    let (_, ua) = raw_hashed(&items, Pairing::UngroundedAnswer);
    let (wq, _) = raw_hashed(&items, Pairing::WrongRetrieval);
    println!("== hashed before calibration");
    println!("{}", line("qr/wrong", &gq, &wq));
    println!("{}", line("ra/ungr", &ga, &ua));
    for kind in [EmbedderKind::Hashed, EmbedderKind::Local] {
        let Some(ev) = evaluator(kind) else { continue };
        let g = score(&ev, &items, Pairing::Grounded);
        let u = score(&ev, &items, Pairing::UngroundedAnswer);
        let w = score(&ev, &items, Pairing::WrongRetrieval);
        println!("== {kind:?} ({} items)", items.len());
        println!("ungrounded answer:");
        println!("{}", line("qr", &g.qr, &u.qr));
        println!("{}", line("ra", &g.ra, &u.ra));
        println!("{}", line("max", &g.max, &u.max));
        let neg = |v: &[f64]| v.iter().map(|x| 1.0 - x).collect::<Vec<_>>();
        println!(
            "{}",
            line("1-coverage", &neg(&g.coverage), &neg(&u.coverage))
        );
        println!("wrong retrieval:");
        println!(
            "{}",
            line(
                "1-ret_cov",
                &neg(&g.retrieval_coverage),
                &neg(&w.retrieval_coverage)
            )
        );
        println!("{}", line("qr", &g.qr, &w.qr));
        println!("{}", line("ra", &g.ra, &w.ra));
        println!("{}", line("max", &g.max, &w.max));
    }
}
