//! The usage reader: token counts from a whole JSON body, an SSE body, a body's tail, and the tap the
//! budget feeds chunk by chunk. Never panics; the tap, which keeps every byte of a body this short,
//! reads the same tokens as the whole-body reader.
#![no_main]

use bytes::Bytes;
use driftguard::signals::usage::{reported_usage, sse_data, usage_in_tail, UsageTap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let sse = flags & 1 == 1;
    let whole = reported_usage(body, sse);
    let _ = usage_in_tail(body);
    for line in body.split(|b| *b == b'\n') {
        let _ = sse_data(line);
    }
    let mut tap = UsageTap::new(1 << 20);
    let step = usize::from(flags >> 1).max(1);
    for chunk in body.chunks(step) {
        tap.push(&Bytes::copy_from_slice(chunk));
    }
    let tapped = tap.usage(sse);
    assert_eq!(whole, tapped, "sse {sse}, step {step}");
});
