//! Unit tests of extraction: pointers, the default and configured pieces, skip reasons, and SSE streams
//! split at every offset.

use std::ops::ControlFlow;

use serde_json::json;

use super::sse::Framer;
use super::*;

fn defaults() -> Extractor {
    Extractor::default()
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn pointer(text: &str) -> Pointer {
    Pointer::parse(text).unwrap()
}

fn rag_response() -> Value {
    json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}}],
        "contexts": [{"text": "Paris is the capital of France."}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3}
    })
}

fn gather_json(ex: &Extractor, request: &Value, response: &Value) -> (Extracted, Option<Skip>) {
    ex.gather(&bytes(request), false, &bytes(response), false, false)
}

// --- pointers ---

#[test]
fn pointer_empty_is_whole_document() {
    let doc = json!({"a": 1});
    assert_eq!(pointer("").matches(&doc), vec![&doc]);
}

#[test]
fn pointer_rejects_missing_slash_and_bad_escapes() {
    for bad in ["a/b", "*", "/a~", "/a~2", "/~x"] {
        assert!(Pointer::parse(bad).is_err(), "{bad:?} should not parse");
    }
    let err = Extractor::new("", "contexts", "", "").unwrap_err();
    assert!(err.to_string().contains("signals.retrieved"), "{err}");
}

#[test]
fn pointer_escapes() {
    let doc = json!({"a/b": {"m~n": 1}, "~1": 2});
    assert_eq!(pointer("/a~1b/m~0n").matches(&doc), vec![&json!(1)]);
    assert_eq!(pointer("/~01").matches(&doc), vec![&json!(2)]);
    assert_eq!(pointer("/a~1b/m~0n").to_string(), "/a~1b/m~0n");
}

#[test]
fn pointer_array_indexes_follow_rfc_6901() {
    let doc = json!({"a": [10, 11, 12], "": {"": 5}});
    assert_eq!(pointer("/a/2").matches(&doc), vec![&json!(12)]);
    assert!(pointer("/a/02").matches(&doc).is_empty());
    assert!(pointer("/a/-").matches(&doc).is_empty());
    assert!(pointer("/a/3").matches(&doc).is_empty());
    assert_eq!(pointer("//").matches(&doc), vec![&json!(5)]);
}

#[test]
fn pointer_wildcard_nested_arrays() {
    let doc = json!({"docs": [
        {"parts": [{"t": "a"}, {"t": "b"}]},
        {"parts": []},
        {"parts": [{"t": "c"}, {"x": "no"}]},
        {"other": 1}
    ]});
    let got: Vec<_> = pointer("/docs/*/parts/*/t")
        .matches(&doc)
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(got, vec![json!("a"), json!("b"), json!("c")]);
    let grid = json!([[1, 2], [3], 4]);
    let got: Vec<_> = pointer("/*/*")
        .matches(&grid)
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(got, vec![json!(1), json!(2), json!(3)]);
}

#[test]
fn pointer_wildcard_object_values() {
    let doc = json!({"hits": {"a": {"text": "one"}, "b": {"text": "two"}, "c": {"score": 1}}});
    let got: Vec<_> = pointer("/hits/*/text")
        .matches(&doc)
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(got, vec![json!("one"), json!("two")]);
}

#[test]
fn pointer_missing_paths_match_nothing() {
    let doc = json!({"a": {"b": "s"}, "n": null});
    for missing in ["/x", "/a/c", "/a/b/c", "/a/b/*", "/n/*", "/a/0"] {
        assert!(pointer(missing).matches(&doc).is_empty(), "{missing}");
    }
}

// --- question ---

#[test]
fn question_last_user_message_wins() {
    let request = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Where is the Louvre?"},
        {"role": "assistant", "content": "(prefill)"}
    ]});
    let (x, skip) = gather_json(&defaults(), &request, &rag_response());
    assert_eq!(x.question.as_deref(), Some("Where is the Louvre?"));
    assert_eq!(skip, None);
}

#[test]
fn question_from_array_of_content_parts() {
    let request = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture."},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "text", "text": "In one line."}
    ]}]});
    let (x, _) = gather_json(&defaults(), &request, &rag_response());
    assert_eq!(
        x.question.as_deref(),
        Some("Describe this picture.\nIn one line.")
    );
}

#[test]
fn question_falls_back_to_question_then_query() {
    let ex = defaults();
    let (x, _) = gather_json(
        &ex,
        &json!({"question": "Q1", "query": "Q2"}),
        &rag_response(),
    );
    assert_eq!(x.question.as_deref(), Some("Q1"));
    let (x, _) = gather_json(&ex, &json!({"query": "Q2"}), &rag_response());
    assert_eq!(x.question.as_deref(), Some("Q2"));
    let no_user = json!({"messages": [{"role": "system", "content": "S"}], "query": "Q3"});
    let (x, _) = gather_json(&ex, &no_user, &rag_response());
    assert_eq!(x.question.as_deref(), Some("Q3"));
}

#[test]
fn missing_or_blank_question_is_skipped() {
    let ex = defaults();
    for request in [
        json!({}),
        json!({"question": "   "}),
        json!({"messages": []}),
        json!([1, 2]),
    ] {
        assert_eq!(
            gather_json(&ex, &request, &rag_response()).1,
            Some(Skip::NoQuestion),
            "{request}"
        );
    }
    let empty_request = ex.extract(b"", false, &bytes(&rag_response()), false, false);
    assert_eq!(empty_request, Err(Skip::NoQuestion));
}

// --- response pieces ---

#[test]
fn chunks_from_contexts_text_and_string_elements() {
    let ex = defaults();
    let q = json!({"question": "q"});
    let objects = json!({"answer": "a", "contexts": [{"text": "one"}, {"id": 2}, {"text": "two"}]});
    assert_eq!(gather_json(&ex, &q, &objects).0.chunks, ["one", "two"]);
    let strings = json!({"answer": "a", "contexts": ["one", 2, "", "two"]});
    assert_eq!(gather_json(&ex, &q, &strings).0.chunks, ["one", "two"]);
    let mixed = json!({"answer": "a", "contexts": ["one", {"text": "two"}]});
    assert_eq!(gather_json(&ex, &q, &mixed).0.chunks, ["one", "two"]);
    let none = json!({"answer": "a", "contexts": []});
    assert_eq!(gather_json(&ex, &q, &none).1, Some(Skip::NoChunks));
}

#[test]
fn answer_default_then_answer_field() {
    let ex = defaults();
    let q = json!({"question": "q"});
    let (x, _) = gather_json(&ex, &q, &rag_response());
    assert_eq!(x.answer.as_deref(), Some("Paris."));
    let plain = json!({"answer": "Lyon.", "contexts": ["c"]});
    assert_eq!(
        gather_json(&ex, &q, &plain).0.answer.as_deref(),
        Some("Lyon.")
    );
    let null_content =
        json!({"choices": [{"message": {"content": null}}], "answer": "Nice.", "contexts": ["c"]});
    assert_eq!(
        gather_json(&ex, &q, &null_content).0.answer.as_deref(),
        Some("Nice.")
    );
    let nothing = json!({"choices": [{"message": {"content": null}}], "contexts": ["c"]});
    assert_eq!(gather_json(&ex, &q, &nothing).1, Some(Skip::NoAnswer));
}

#[test]
fn usage_tokens() {
    let (x, _) = gather_json(&defaults(), &json!({"question": "q"}), &rag_response());
    assert_eq!((x.prompt_tokens, x.completion_tokens), (Some(12), Some(3)));
    let bad = json!({"answer": "a", "contexts": ["c"], "usage": {"prompt_tokens": -1}});
    let (x, _) = gather_json(&defaults(), &json!({"question": "q"}), &bad);
    assert_eq!((x.prompt_tokens, x.completion_tokens), (None, None));
}

#[test]
fn tool_calls_from_the_message() {
    let response = json!({"choices": [{"message": {"content": null, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"paris\"}"}},
        {"id": "2", "type": "function", "function": {"name": "lookup", "arguments": {"id": 7}}},
        {"id": "3", "type": "function", "function": {"arguments": "{}"}}
    ]}}]});
    let (x, skip) = gather_json(&defaults(), &json!({"question": "q"}), &response);
    assert_eq!(
        x.tool_calls,
        [
            ("search".to_owned(), "{\"q\": \"paris\"}".to_owned()),
            ("lookup".to_owned(), "{\"id\":7}".to_owned())
        ]
    );
    // A tool-calling turn has no answer: skipped for ΔS, but the calls are still there for loops.
    assert_eq!(skip, Some(Skip::NoAnswer));
}

#[test]
fn configured_pointers_override_defaults() {
    let ex = Extractor::new("/input/text", "/sources/*/body", "/output", "/expected").unwrap();
    let request = json!({"input": {"text": "Q?"}, "question": "ignored", "expected": "Gold."});
    let response = json!({
        "output": "A.", "answer": "ignored",
        "sources": [{"body": "S1"}, {"body": "S2"}], "contexts": [{"text": "ignored"}]
    });
    let x = ex
        .extract(&bytes(&request), false, &bytes(&response), false, false)
        .unwrap();
    assert_eq!(x.question.as_deref(), Some("Q?"));
    assert_eq!(x.answer.as_deref(), Some("A."));
    assert_eq!(x.chunks, ["S1", "S2"]);
    assert_eq!(x.anchor.as_deref(), Some("Gold."));
}

#[test]
fn configured_pointer_never_falls_back_to_defaults() {
    let ex = Extractor::new("/prompt", "", "", "").unwrap();
    let request = json!({"question": "default would find this"});
    assert_eq!(
        gather_json(&ex, &request, &rag_response()).1,
        Some(Skip::NoQuestion)
    );
}

#[test]
fn anchor_from_request_first_then_response() {
    let ex = Extractor::new("", "", "", "/gold").unwrap();
    let mut response = rag_response();
    response["gold"] = json!("From the response.");
    let (x, _) = gather_json(
        &ex,
        &json!({"question": "q", "gold": "From the request."}),
        &response,
    );
    assert_eq!(x.anchor.as_deref(), Some("From the request."));
    let (x, _) = gather_json(&ex, &json!({"question": "q"}), &response);
    assert_eq!(x.anchor.as_deref(), Some("From the response."));
    let (x, _) = gather_json(
        &defaults(),
        &json!({"question": "q", "gold": "g"}),
        &response,
    );
    assert_eq!(x.anchor, None);
}

#[test]
fn malformed_or_truncated_bodies_skip_with_their_reason() {
    let ex = defaults();
    let good_req = bytes(&json!({"question": "q"}));
    let good_resp = bytes(&rag_response());
    assert_eq!(
        ex.extract(b"{\"question\":", false, &good_resp, false, false),
        Err(Skip::RequestNotJson)
    );
    assert_eq!(
        ex.extract(&good_req, false, b"<html>502</html>", false, false),
        Err(Skip::ResponseNotJson)
    );
    assert_eq!(
        ex.extract(&good_req, false, &good_resp[..10], true, false),
        Err(Skip::Truncated)
    );
    assert_eq!(
        ex.extract(&good_req[..5], true, &good_resp, false, false),
        Err(Skip::Truncated)
    );
    assert_eq!(
        ex.extract(b"nope", false, b"nope", false, false),
        Err(Skip::RequestNotJson)
    );
    assert_eq!(
        ex.extract(&good_req, false, b"", false, false),
        Err(Skip::NoAnswer)
    );
    assert!(ex
        .extract(&good_req, false, &good_resp, false, false)
        .is_ok());
}

#[test]
fn gather_keeps_usage_when_skipping() {
    let (x, skip) = defaults().gather(b"not json", false, &bytes(&rag_response()), false, false);
    assert_eq!(skip, Some(Skip::RequestNotJson));
    assert_eq!(x.prompt_tokens, Some(12));
}

#[test]
fn skip_labels() {
    let labels: Vec<_> = Skip::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        labels,
        [
            "request_not_json",
            "response_not_json",
            "no_question",
            "no_answer",
            "no_chunks",
            "truncated"
        ]
    );
    assert_eq!(Skip::NoChunks.to_string(), "no_chunks");
}

// --- SSE ---

const DELTAS: [&str; 5] = [
    "The capital",
    " of France",
    " is Paris",
    " — café",
    " ☕ 東京 no.",
];

fn openai_stream(line_end: &str) -> Vec<u8> {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    events.extend(
        DELTAS
            .iter()
            .map(|d| chunk(json!({"content": d}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    events.push(
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
        "contexts": [{"text": "Paris is the capital of France."}, {"text": "Café culture ☕."}],
        "usage": {"prompt_tokens": 57, "completion_tokens": 14, "total_tokens": 71}}),
    );
    let mut out = format!(": keep-alive{line_end}{line_end}");
    for event in events {
        out.push_str(&format!("data: {event}{line_end}{line_end}"));
    }
    out.push_str(&format!("data: [DONE]{line_end}{line_end}"));
    out.into_bytes()
}

fn assert_stream_result(result: &SseResult, what: &str) {
    assert_eq!(
        result.answer.as_deref(),
        Some(DELTAS.concat().as_str()),
        "{what}"
    );
    assert_eq!(
        result.chunks,
        ["Paris is the capital of France.", "Café culture ☕."],
        "{what}"
    );
    assert_eq!(
        (result.prompt_tokens, result.completion_tokens),
        (Some(57), Some(14)),
        "{what}"
    );
    assert_eq!(
        (result.events, result.bad_events, result.done),
        (8, 0, true),
        "{what}"
    );
}

fn parse_pieces(pieces: &[&[u8]]) -> SseResult {
    let mut parser = defaults().sse_parser();
    for piece in pieces {
        parser.push(piece);
    }
    parser.finish()
}

#[test]
fn sse_stream_split_at_every_offset() {
    for line_end in ["\n", "\r\n", "\r"] {
        let stream = openai_stream(line_end);
        assert_stream_result(&parse_pieces(&[&stream]), "whole");
        for at in 0..=stream.len() {
            let (a, b) = stream.split_at(at);
            assert_stream_result(
                &parse_pieces(&[a, b]),
                &format!("{line_end:?} split at {at}"),
            );
        }
    }
}

#[test]
fn sse_stream_in_one_byte_chunks() {
    for line_end in ["\n", "\r\n", "\r"] {
        let stream = openai_stream(line_end);
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        assert_stream_result(
            &parse_pieces(&pieces),
            &format!("{line_end:?} one byte at a time"),
        );
    }
}

#[test]
fn sse_through_extractor() {
    let ex = defaults();
    let request =
        bytes(&json!({"messages": [{"role": "user", "content": "What is the capital?"}]}));
    let x = ex
        .extract(&request, false, &openai_stream("\n"), false, true)
        .unwrap();
    assert_eq!(x.answer.as_deref(), Some(DELTAS.concat().as_str()));
    assert_eq!(x.chunks.len(), 2);
    assert_eq!(x.prompt_tokens, Some(57));
    let mut parser = ex.sse_parser();
    parser.push(&openai_stream("\r\n"));
    assert_eq!(ex.extract_with_sse(&request, false, parser.finish()), Ok(x));
}

#[test]
fn sse_multibyte_char_split_across_chunks() {
    let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"日本\"}}]}\n\n".as_bytes();
    let inside = stream.iter().position(|&b| b >= 0x80).unwrap() + 1;
    let result = parse_pieces(&[
        &stream[..inside],
        &stream[inside..inside + 1],
        &stream[inside + 1..],
    ]);
    assert_eq!(result.answer.as_deref(), Some("日本"));
    assert_eq!(result.bad_events, 0);
}

fn payloads(stream: &[u8]) -> Vec<String> {
    let mut framer = Framer::default();
    let mut out = Vec::new();
    let mut collect = |data: &[u8]| {
        out.push(String::from_utf8_lossy(data).into_owned());
        ControlFlow::Continue(())
    };
    framer.push(stream, &mut collect);
    framer.finish(&mut collect);
    out
}

#[test]
fn sse_multiline_data_joined_with_newline() {
    assert_eq!(
        payloads(b"data: one\ndata:two\ndata:  three\n\n"),
        ["one\ntwo\n three"]
    );
    let stream = b"data: {\"answer\":\ndata: \"joined\",\ndata: \"contexts\": [\"c\"]}\n\n";
    let result = parse_pieces(&[stream]);
    assert_eq!(result.answer.as_deref(), Some("joined"));
    assert_eq!(result.chunks, ["c"]);
}

#[test]
fn sse_comments_and_other_fields_ignored() {
    let stream =
        b"\xEF\xBB\xBFevent: message\n: comment data: no\nid: 7\nretry: 10\ndata\ndata: x\n\n\
                   event: ping\n\n: only a comment\n\ndatum: y\n\n";
    assert_eq!(payloads(stream), ["\nx"]);
}

#[test]
fn sse_done_ends_the_stream_and_bad_events_are_counted() {
    let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                   data: not json\n\n\
                   data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                   data: [DONE]\n\n\
                   data: {\"choices\":[{\"delta\":{\"content\":\"c\"}}]}\n\n";
    let result = parse_pieces(&[stream]);
    assert_eq!(result.answer.as_deref(), Some("ab"));
    assert_eq!(
        (result.events, result.bad_events, result.done),
        (3, 1, true)
    );
}

#[test]
fn sse_truncated_stream_keeps_complete_events_only() {
    let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                   data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n";
    let mut parser = defaults().sse_parser();
    parser.mark_truncated();
    parser.push(stream);
    let result = parser.finish();
    assert_eq!(result.answer.as_deref(), Some("a"));
    assert!(result.truncated);
    // The same bytes as a complete stream: the last event lacks only its blank line and counts.
    assert_eq!(parse_pieces(&[stream]).answer.as_deref(), Some("ab"));
    assert_eq!(
        parse_pieces(&[&stream[..stream.len() - 1]])
            .answer
            .as_deref(),
        Some("ab")
    );
}

#[test]
fn sse_all_events_malformed_is_response_not_json() {
    let request = bytes(&json!({"question": "q"}));
    let skip = defaults().extract(
        &request,
        false,
        b"data: {oops\n\ndata: <html>\n\n",
        false,
        true,
    );
    assert_eq!(skip, Err(Skip::ResponseNotJson));
    assert_eq!(
        defaults().extract(&request, false, b"", false, true),
        Err(Skip::NoAnswer)
    );
}

#[test]
fn sse_tool_call_fragments_assembled_by_index() {
    let events = [
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "search", "arguments": ""}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\""}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": " \"paris\"}"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": ": 7}"}}]}}]}),
        json!({"choices": [{"index": 1, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": "other_choice", "arguments": "{}"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ];
    let stream: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    let stream = stream.as_bytes();
    let expected = [
        ("search".to_owned(), "{\"q\": \"paris\"}".to_owned()),
        ("lookup".to_owned(), "{\"id\": 7}".to_owned()),
    ];
    for at in 0..=stream.len() {
        let result = parse_pieces(&[&stream[..at], &stream[at..]]);
        assert_eq!(result.tool_calls, expected, "split at {at}");
        assert_eq!(result.answer, None);
    }
}

#[test]
fn sse_configured_pointers_apply_to_every_event() {
    let ex = Extractor::new("", "/docs/*", "/token", "/gold").unwrap();
    let stream = b"data: {\"token\": \"Hel\", \"docs\": [\"d1\"]}\n\n\
                   data: {\"token\": \"lo\", \"gold\": \"g\"}\n\n\
                   data: {\"docs\": [\"d2\"], \"gold\": \"later\", \"usage\": {\"prompt_tokens\": 4}}\n\n";
    let mut parser = ex.sse_parser();
    parser.push(stream);
    let result = parser.finish();
    assert_eq!(result.answer.as_deref(), Some("Hello"));
    assert_eq!(result.chunks, ["d1", "d2"]);
    assert_eq!(result.anchor.as_deref(), Some("g"));
    assert_eq!(result.prompt_tokens, Some(4));
}
