//! Fuzzes the `litework add` input parsers: any bytes, in every format,
//! with a small record limit. A parser may refuse input, but must not
//! panic, and what it accepts must hold to the format's promises.

#![no_main]

use libfuzzer_sys::fuzz_target;
use litework::input::{Defaults, Format, Records};

const LIMIT: usize = 64;

fuzz_target!(|data: &[u8]| {
    for format in [Format::Lines, Format::Jsonl, Format::Nul] {
        let defaults = Defaults {
            max_record: LIMIT,
            key_from_payload: data.first().is_some_and(|b| b & 1 == 1),
            ..Defaults::default()
        };
        let mut records = 0usize;
        for record in Records::new(data, "fuzz", format, defaults) {
            match record {
                Ok(item) => {
                    records += 1;
                    match format {
                        // A line or NUL-separated record never holds its
                        // delimiter, fits the limit, and is never empty.
                        Format::Lines => {
                            assert!(!item.payload.contains(&b'\n'));
                            assert!(std::str::from_utf8(&item.payload).is_ok());
                            assert!(!item.payload.is_empty() && item.payload.len() <= LIMIT);
                        }
                        Format::Nul => {
                            assert!(!item.payload.contains(&0));
                            assert!(!item.payload.is_empty() && item.payload.len() <= LIMIT);
                        }
                        Format::Jsonl => {
                            assert!(item.max_attempts.is_none_or(|n| n >= 1));
                        }
                    }
                }
                Err(e) => {
                    // An error names the input and stops the iteration.
                    assert!(e.to_string().starts_with("fuzz"), "{e}");
                }
            }
        }
        // Records are at most one per delimiter, plus a last unterminated one.
        let delim = if format == Format::Nul { 0 } else { b'\n' };
        assert!(records <= data.iter().filter(|&&b| b == delim).count() + 1);
    }
});
