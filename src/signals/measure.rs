//! Measures (SPEC §3): ΔS, coverage, λ, tool loops and ΔS bands — pure functions of the embeddings
//! and texts one evaluation extracted. The signals workers call them off the request path and record
//! the results into the windows; the rule engine reads them there.

use std::cell::RefCell;
use std::collections::HashMap;

use super::embed::{centroid, cosine_f64, hash_bytes, low_bytes, mix, Word, Words};

/// Values within this distance of a band edge count as on the edge: `0.52 - 0.50` is
/// `0.020000000000000018` in f64, and a Delta that is mathematically 0.02 must land where SPEC §3 puts
/// 0.02, whatever the rounding of the subtraction that produced it.
const EDGE_EPSILON: f64 = 1e-9;

// === ΔS ===

/// ΔS(a, b) = 1 − cos(a, b), clamped to [0, 1]; 1.0 when either vector is zero (or they are not
/// comparable: different lengths, non-finite values).
pub fn delta_s(a: &[f32], b: &[f32]) -> f64 {
    let cos = cosine_f64(a, b);
    if cos == 0.0 || !cos.is_finite() {
        return 1.0;
    }
    (1.0 - cos).clamp(0.0, 1.0)
}

/// The three ΔS probes of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeltaS {
    /// ΔS(question, C), C = the retrieved centroid: did retrieval fetch what was asked?
    pub qr: f64,
    /// ΔS(C, anchor): does the answer (or the gold anchor) stay on the retrieved evidence?
    pub ra: f64,
    /// max(qr, ra): the `delta_s` of SPEC §3.
    pub max: f64,
}

/// The two ΔS probes, as rules, lever defaults, snapshots and reports name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Probe {
    /// ΔS(question, retrieved): did retrieval fetch what was asked? (`qr`)
    Retrieval,
    /// ΔS(retrieved, answer): does the answer stay on the retrieved evidence? (`ra`)
    Answer,
}

impl Probe {
    pub fn as_str(self) -> &'static str {
        match self {
            Probe::Retrieval => "retrieval",
            Probe::Answer => "answer",
        }
    }
}

impl DeltaS {
    /// The probes mapped by `calibrate` (an embedder's [`super::embed::Embedder::calibrate`]), the
    /// max taken again.
    pub fn calibrated(self, calibrate: impl Fn(Probe, f64) -> f64) -> DeltaS {
        let qr = calibrate(Probe::Retrieval, self.qr).clamp(0.0, 1.0);
        let ra = calibrate(Probe::Answer, self.ra).clamp(0.0, 1.0);
        DeltaS {
            qr,
            ra,
            max: qr.max(ra),
        }
    }
}

/// The ΔS probes from the question, chunk and anchor embeddings. No chunks → C is zero → both probes
/// are 1.0.
pub fn delta_s_probes(question: &[f32], chunks: &[Vec<f32>], anchor: &[f32]) -> DeltaS {
    let c = centroid(chunks);
    let qr = delta_s(question, &c);
    let ra = delta_s(&c, anchor);
    DeltaS {
        qr,
        ra,
        max: qr.max(ra),
    }
}

// === ΔS band ===

/// Where a ΔS value sits: stable < 0.40 ≤ transitional < 0.60 ≤ risk < 0.85 ≤ danger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Band {
    Stable,
    Transitional,
    Risk,
    Danger,
}

impl Band {
    pub const ALL: [Band; 4] = [Band::Stable, Band::Transitional, Band::Risk, Band::Danger];

    pub fn as_str(self) -> &'static str {
        match self {
            Band::Stable => "stable",
            Band::Transitional => "transitional",
            Band::Risk => "risk",
            Band::Danger => "danger",
        }
    }
}

/// The band of a ΔS value. An edge belongs to the band above it; NaN is [`Band::Danger`].
pub fn band(ds: f64) -> Band {
    if ds < 0.40 - EDGE_EPSILON {
        Band::Stable
    } else if ds < 0.60 - EDGE_EPSILON {
        Band::Transitional
    } else if ds < 0.85 - EDGE_EPSILON {
        Band::Risk
    } else {
        Band::Danger
    }
}

// === λ ===

/// The convergence state of a ΔS series (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lambda {
    /// ΔS fell by 0.02 or more.
    Convergent = 0,
    /// ΔS moved by less than 0.02 either way.
    Recursive = 1,
    /// ΔS rose by 0.02 to 0.04.
    Divergent = 2,
    /// ΔS rose by more than 0.04.
    Chaotic = 3,
}

impl Lambda {
    pub const ALL: [Lambda; 4] = [
        Lambda::Convergent,
        Lambda::Recursive,
        Lambda::Divergent,
        Lambda::Chaotic,
    ];

    /// The state's position in [`Lambda::ALL`]: the index an evaluation records; the windows keep the
    /// one list of the states' names in this order (`windows::LAMBDA_STATES`).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// λ from the last two steps of a ΔS series, Delta = last − previous: convergent if Delta ≤ −0.02;
/// recursive if |Delta| < 0.02; divergent if 0.02 ≤ Delta ≤ 0.04; chaotic if Delta > 0.04. Edges
/// are decided with [`EDGE_EPSILON`]; a NaN Delta is recursive (no evidence of a change).
pub fn lambda(previous: f64, last: f64) -> Lambda {
    let delta = last - previous;
    if delta.is_nan() {
        Lambda::Recursive
    } else if delta <= -0.02 + EDGE_EPSILON {
        Lambda::Convergent
    } else if delta < 0.02 - EDGE_EPSILON {
        Lambda::Recursive
    } else if delta <= 0.04 + EDGE_EPSILON {
        Lambda::Divergent
    } else {
        Lambda::Chaotic
    }
}

/// Divergent and chaotic states are the flips of the λ flip rate.
pub fn is_flip(l: Lambda) -> bool {
    matches!(l, Lambda::Divergent | Lambda::Chaotic)
}

// === Coverage ===

/// Stopwords, sorted (for the reader). Only words of 3+ chars: shorter words are never content
/// tokens anyway. Contraction stems (`don`, `isn`) are here because `don't` splits into `don` + `t`.
#[rustfmt::skip]
const STOPWORDS: &[&str] = &[
    "about", "above", "across", "after", "again", "against", "all", "almost", "along", "already",
    "also", "although", "always", "among", "and", "another", "any", "anyone", "anything", "are",
    "aren", "around", "because", "been", "before", "behind", "being", "below", "beneath", "beside",
    "besides", "between", "beyond", "both", "but", "can", "cannot", "could", "couldn", "did",
    "didn", "does", "doesn", "doing", "don", "done", "down", "during", "each", "either", "else",
    "even", "ever", "every", "few", "for", "from", "further", "had", "hadn", "has", "hasn", "have",
    "haven", "having", "her", "here", "hers", "herself", "him", "himself", "his", "how", "however",
    "into", "isn", "its", "itself", "just", "may", "might", "mine", "more", "most", "much", "must",
    "myself", "near", "neither", "never", "nor", "not", "now", "off", "often", "once", "only",
    "onto", "other", "others", "ought", "our", "ours", "ourselves", "out", "over", "own", "per",
    "quite", "rather", "really", "same", "shall", "she", "should", "shouldn", "since", "some",
    "still", "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then",
    "there", "therefore", "these", "they", "this", "those", "though", "through", "thus", "till",
    "too", "toward", "towards", "under", "unless", "until", "upon", "very", "via", "was", "wasn",
    "were", "weren", "what", "when", "where", "whether", "which", "while", "who", "whom", "whose",
    "why", "will", "with", "within", "without", "would", "wouldn", "yet", "you", "your", "yours",
    "yourself", "yourselves",
];

/// Stemming suffixes, tried in this order; only the first that matches is considered.
const SUFFIXES: [&str; 12] = [
    "ations", "ation", "ings", "ing", "ies", "ied", "ers", "er", "ed", "es", "s", "ly",
];

/// [`SUFFIXES`] in the layout of [`Word::tail`] (last byte lowest), with the mask of their bytes
/// and their lengths: a suffix test is one masked compare.
static SUFFIX_TAILS: [(u64, u64, usize); 12] = {
    let mut tails = [(0, 0, 0); 12];
    let mut i = 0;
    while i < SUFFIXES.len() {
        let bytes = SUFFIXES[i].as_bytes();
        let mut tail = 0;
        let mut k = 0;
        while k < bytes.len() {
            tail = (tail << 8) | bytes[k] as u64;
            k += 1;
        }
        tails[i] = (tail, low_bytes(bytes.len()), bytes.len());
        i += 1;
    }
    tails
};

/// The byte length of a word's stem: without the first suffix of [`SUFFIXES`] the word ends with,
/// when at least 3 chars remain; otherwise (and when none matches) the whole word. Later suffixes
/// are not tried once one matched: `fries` keeps its `ies` (only `fr` would remain) rather than
/// losing just its `s`.
fn stem_len(tail: u64, len: usize, chars: usize) -> usize {
    // Most words end in a letter no suffix ends in.
    if !matches!(tail as u8, b's' | b'n' | b'g' | b'd' | b'r' | b'y') {
        return len;
    }
    for &(suffix, mask, n) in &SUFFIX_TAILS {
        if tail & mask == suffix {
            // The suffixes are ASCII: n bytes are n chars, and the stem ends on a char boundary.
            return if chars >= n + 3 { len - n } else { len };
        }
    }
    len
}

/// The tail block of a word given as a str (the split computes it for [`Word`]s).
#[cfg(test)]
fn tail_of(word: &str) -> u64 {
    let bytes = word.as_bytes();
    bytes[bytes.len().saturating_sub(8)..]
        .iter()
        .fold(0, |tail, &b| (tail << 8) | u64::from(b))
}

/// [`stem_len`] applied to a str.
#[cfg(test)]
fn stem(word: &str) -> &str {
    let len = stem_len(tail_of(word), word.len(), word.chars().count());
    word.get(..len).unwrap_or(word)
}

/// Stopwords hash with their own start state.
const STOPWORD_STATE: u64 = mix(0x7374_6f70_776f_7264, 0); // "stopword"
const STOPWORD_MAX_LEN: usize = 10;
const STOPWORD_SLOTS: usize = 512;

/// An open-addressing set of [`STOPWORDS`] built at compile time: (hash, index + 1; 0 = empty).
static STOPWORD_TABLE: [(u64, u8); STOPWORD_SLOTS] = {
    let mut table = [(0, 0); STOPWORD_SLOTS];
    let mut i = 0;
    while i < STOPWORDS.len() {
        let word = STOPWORDS[i].as_bytes();
        assert!(word.len() <= STOPWORD_MAX_LEN && STOPWORDS.len() < 255);
        let hash = hash_bytes(STOPWORD_STATE, word);
        let mut slot = hash as usize % STOPWORD_SLOTS;
        while table[slot].1 != 0 {
            slot = (slot + 1) % STOPWORD_SLOTS;
        }
        table[slot] = (hash, i as u8 + 1);
        i += 1;
    }
    table
};

fn is_stopword_hashed(word: &str, hash: u64) -> bool {
    let mut slot = hash as usize % STOPWORD_SLOTS;
    loop {
        match STOPWORD_TABLE[slot] {
            (_, 0) => return false,
            (h, i) if h == hash && STOPWORDS.get(usize::from(i) - 1) == Some(&word) => return true,
            _ => slot = (slot + 1) % STOPWORD_SLOTS,
        }
    }
}

#[cfg(test)]
fn is_stopword(word: &str) -> bool {
    word.len() <= STOPWORD_MAX_LEN
        && is_stopword_hashed(word, hash_bytes(STOPWORD_STATE, word.as_bytes()))
}

/// A content token: 3+ chars, not all numeric (Unicode `Numeric`, so ASCII digits and other
/// scripts' digits), not a stopword.
fn is_content(word: &Word) -> bool {
    word.chars >= 3
        && !(if word.is_ascii() {
            word.text.bytes().all(|b| b.is_ascii_digit())
        } else {
            word.text.chars().all(char::is_numeric)
        })
        && !(word.text.len() <= STOPWORD_MAX_LEN
            && is_stopword_hashed(word.text, word.hash_prefix(STOPWORD_STATE, word.text.len())))
}

/// The stem of a content token.
pub(crate) fn content_stem<'a>(word: &Word<'a>) -> Option<&'a str> {
    if !is_content(word) {
        return None;
    }
    let len = stem_len(word.tail, word.text.len(), word.chars);
    Some(word.text.get(..len).unwrap_or(word.text))
}

/// The content tokens of `text` in order, repeats kept, stemmed: lowercased words (as the embedder
/// splits them) of 3+ chars, not all numeric, not stopwords. Allocates; [`coverage`] does not.
pub fn content_tokens(text: &str) -> impl Iterator<Item = String> {
    let mut words = Words::default();
    words.split(text);
    let tokens: Vec<String> = words
        .iter()
        .filter_map(|w| content_stem(&w))
        .map(str::to_owned)
        .collect();
    tokens.into_iter()
}

/// Evidence coverage (SPEC §3): the share of the answer's **distinct** content tokens (after
/// stemming) that occur among the chunks' content tokens (after stemming). A token repeated in the
/// answer counts once, so repetition neither inflates nor dilutes coverage. `None` when the answer has
/// no content tokens (the sample is not counted).
pub fn coverage(answer: &str, chunks: &[&str]) -> Option<f64> {
    COVERAGE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => scratch.coverage(answer, chunks),
        // Unreachable (coverage never re-enters), but costs nothing to survive.
        Err(_) => CoverageScratch::default().coverage(answer, chunks),
    })
}

/// [`coverage`] of texts already split: the evaluation splits each text once for all its measures.
pub(crate) fn coverage_of_words(answer: &Words, chunks: &[Words]) -> Option<f64> {
    COVERAGE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => scratch.stems.coverage(answer, chunks),
        Err(_) => Stems::default().coverage(answer, chunks),
    })
}

/// Bits of the answer-stem prefix filter of [`coverage`] (a power of two).
const PREFIX_BITS: usize = 4096;
/// An odd constant for the multiplicative hash of the prefix filter.
const C_PREFIX: u64 = 0x9e37_79b9_7f4a_7c15;

thread_local! {
    /// Per-thread buffers of [`coverage`].
    static COVERAGE: RefCell<CoverageScratch> = RefCell::new(CoverageScratch::default());
}

#[derive(Default)]
struct CoverageScratch {
    /// The splits of [`coverage`]'s texts.
    answer: Words,
    chunks: Vec<Words>,
    stems: Stems,
}

struct Stems {
    /// The answer's distinct stems: an open-addressing set (linear probing), emptied after each use.
    stems: Vec<Stem>,
    /// Start state of the stem hash, random per thread: texts cannot be crafted to collide in
    /// `stems`.
    state: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stem {
    hash: u64,
    /// Where the stem is in the answer's split buffer; `len == 0` marks an empty slot.
    start: usize,
    len: usize,
    found: bool,
}

impl Default for Stems {
    fn default() -> Self {
        Stems {
            stems: Vec::new(),
            state: mix(fastrand::u64(..), 5),
        }
    }
}

impl CoverageScratch {
    fn coverage(&mut self, answer: &str, chunks: &[&str]) -> Option<f64> {
        self.answer.split(answer);
        if self.chunks.len() < chunks.len() {
            self.chunks.resize_with(chunks.len(), Words::default);
        }
        for (words, chunk) in self.chunks.iter_mut().zip(chunks) {
            words.split(chunk);
        }
        let split = self.chunks.get(..chunks.len()).unwrap_or_default();
        self.stems.coverage(&self.answer, split)
    }
}

impl Stems {
    fn coverage(&mut self, answer_words: &Words, chunks: &[Words]) -> Option<f64> {
        let Stems { stems, state } = self;
        let capacity = (2 * answer_words.len()).next_power_of_two().max(16);
        if stems.len() < capacity {
            stems.resize(capacity, Stem::default());
        }
        let stems = &mut stems[..capacity];
        let mask = capacity - 1;
        let lowered = answer_words.lowered();
        // The slot of a stem: either the one holding it or the empty one where it belongs.
        let find = |stems: &[Stem], hash: u64, stem: &str| {
            let mut i = hash as usize & mask;
            loop {
                let slot = stems[i];
                if slot.len == 0
                    || (slot.hash == hash
                        && lowered.get(slot.start..slot.start + slot.len) == Some(stem))
                {
                    return i;
                }
                i = (i + 1) & mask;
            }
        };

        // A stem has 3+ chars, so 3+ bytes, all of them a prefix of its word. A bit per answer stem
        // for its first 3 bytes lets most chunk words go after one lookup.
        let mut prefixes = [0u64; PREFIX_BITS / 64];
        let prefix_bit = |head: u64| {
            ((head & 0xff_ffff).wrapping_mul(C_PREFIX) >> (64 - PREFIX_BITS.trailing_zeros()))
                as usize
        };
        let mut total = 0u32;
        for word in answer_words.iter() {
            let Some(stem) = content_stem(&word) else {
                continue;
            };
            let bit = prefix_bit(word.head);
            prefixes[bit / 64] |= 1 << (bit % 64);
            let hash = word.hash_prefix(*state, stem.len());
            let i = find(stems, hash, stem);
            if stems[i].len == 0 {
                stems[i] = Stem {
                    hash,
                    start: answer_words.offset_of(stem),
                    len: stem.len(),
                    found: false,
                };
                total += 1;
            }
        }
        if total == 0 {
            return None;
        }

        // Chunk words are only looked up, stem first; the full content test runs on hits alone, and
        // the scan stops once every answer stem is found.
        let mut found = 0u32;
        'chunks: for chunk_words in chunks {
            for word in chunk_words.iter() {
                if word.chars < 3 {
                    continue;
                }
                let bit = prefix_bit(word.head);
                if prefixes[bit / 64] & (1 << (bit % 64)) == 0 {
                    continue;
                }
                let len = stem_len(word.tail, word.text.len(), word.chars);
                let Some(stem) = word.text.get(..len) else {
                    continue;
                };
                let i = find(stems, word.hash_prefix(*state, len), stem);
                let slot = &mut stems[i];
                if slot.len != 0 && !slot.found && is_content(&word) {
                    slot.found = true;
                    found += 1;
                    if found == total {
                        break 'chunks;
                    }
                }
            }
        }
        stems.fill(Stem::default());
        Some(f64::from(found) / f64::from(total))
    }
}

// === Tool loops ===

/// One tool call of a response: the function name and its arguments as sent (a JSON string).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// The same call (name and arguments) 3 or more times in one response.
pub fn loops_in_response(calls: &[ToolCall]) -> bool {
    if calls.len() < 3 {
        return false;
    }
    let mut seen: HashMap<&ToolCall, u32> = HashMap::with_capacity(calls.len());
    calls.iter().any(|call| {
        let n = seen.entry(call).or_insert(0);
        *n += 1;
        *n >= 3
    })
}

/// The cross-response half of the tool-loop rule, one per session: fed the calls of each response
/// of the session in order, it reports a loop when a call appears in 3 consecutive responses. (The
/// in-response half is [`loops_in_response`].)
#[derive(Debug, Clone, Default)]
pub struct SessionTools {
    /// The calls of the last response, each with the number of consecutive responses, up to and
    /// including that one, it appeared in (capped at 2: all the next response needs to know).
    streaks: HashMap<ToolCall, u8>,
}

impl SessionTools {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the next response's calls; true when one of them was also in each of the two
    /// responses before. A loop that goes on is reported again on every further response.
    pub fn observe(&mut self, calls: &[ToolCall]) -> bool {
        let mut looped = false;
        let mut next = HashMap::with_capacity(calls.len());
        for call in calls {
            if next.contains_key(call) {
                continue;
            }
            let streak = self.streaks.get(call).map_or(1, |s| s + 1);
            looped |= streak >= 3;
            next.insert(call.clone(), streak.min(2));
        }
        self.streaks = next;
        looped
    }
}

#[cfg(test)]
mod tests;
