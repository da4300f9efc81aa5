//! Fuzzes the observation body decoders (JSON, NDJSON, CSV) and, for whatever decodes, the
//! batch validation of a stream: nothing may panic, and a decoded batch either plans or is
//! refused with a named field.
#![no_main]

use std::sync::OnceLock;

use ekid::engine::Options;
use ekid::server::body::{decode_csv, decode_json, decode_ndjson};
use ekid::engine::Stream;
use libfuzzer_sys::fuzz_target;

fn stream() -> &'static Stream {
    static S: OnceLock<Stream> = OnceLock::new();
    S.get_or_init(|| {
        let o = Options { ensemble: 4, hidden: 2, lags: 1, inputs: 1, ..Options::default() };
        Stream::new(o.check().expect("valid options"))
    })
}

fuzz_target!(|data: &[u8]| {
    for decoded in [decode_json(data), decode_ndjson(data), decode_csv(data)] {
        if let Ok(batch) = decoded {
            match stream().plan(&batch) {
                Ok(plan) => assert!(plan.accepted.len() + plan.duplicates <= batch.len()),
                Err(e) => assert!(!e.field().is_empty()),
            }
        }
    }
});
