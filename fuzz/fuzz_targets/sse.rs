//! The SSE assembler (and the whole extractor on the same bytes): fed in arbitrary splits, as the body
//! arrives; the same bytes give the same result whatever the split.
#![no_main]

use driftguard::signals::extract::Extractor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let Ok(extractor) = Extractor::new("", "", "", "") else {
        return;
    };
    let mut whole = extractor.sse_parser();
    whole.push(body);
    let whole = whole.finish();
    let mut parts = extractor.sse_parser();
    let step = usize::from(split).max(1);
    for chunk in body.chunks(step) {
        parts.push(chunk);
    }
    let parts = parts.finish();
    assert_eq!(whole.events, parts.events);
    assert_eq!(whole.answer, parts.answer);
    assert_eq!(whole.chunks, parts.chunks);
    let _ = extractor.gather(b"{}", false, body, split & 1 == 1, true);
    let _ = extractor.gather(body, false, body, false, false);
});
