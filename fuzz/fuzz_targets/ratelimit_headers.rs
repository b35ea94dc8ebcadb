//! Discord's rate-limit headers and 429 body: the input is split on '\n' into header
//! values (bucket, limit, remaining, reset-after, global, scope, retry-after) and a body
//! `retry_after` float. Parsing must never panic.
#![no_main]

use guildgate::discord::ratelimit::Observed;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 7] = [
    "x-ratelimit-bucket",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset-after",
    "x-ratelimit-global",
    "x-ratelimit-scope",
    "retry-after",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let status = match parts.next().map(str::len).unwrap_or(0) % 3 {
        0 => 429,
        1 => 200,
        _ => 403,
    };
    let values: Vec<Option<String>> = NAMES
        .iter()
        .map(|_| parts.next().map(str::to_string))
        .collect();
    let body_retry = parts.next().and_then(|s| s.trim().parse::<f64>().ok());
    let o = Observed::parse(status, |name| {
        NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values[i].clone())
    });
    if status != 429 {
        assert!(o.retry_after.is_none());
    }
    let o = o.with_body_retry_after(body_retry, Some(true));
    let _ = (o.is_global_limit(), o.counts_as_invalid());
});
