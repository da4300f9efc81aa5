//! Fuzzes the observation body decoders (JSON, NDJSON, CSV) and, for whatever decodes, the
//! batch validation of a stream: nothing may panic, and a decoded batch either plans or is
//! refused with a named field. The checked decoders (the stream's shape, a batch limit) must
//! only pass batches the stream's own validation takes, and the forecast decoder must not panic.
#![no_main]

use std::sync::OnceLock;

use ekid::engine::{BatchError, Options, Stream};
use ekid::server::body::{
    Expect, Format, decode, decode_csv, decode_forecast, decode_json, decode_ndjson,
};
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
    let o = stream().options();
    let expect = Expect { shape: Some((o.inputs, o.outputs)), max_observations: 16 };
    for format in [Format::Json, Format::Ndjson, Format::Csv] {
        if let Ok(batch) = decode(format, data, &expect) {
            assert!(batch.len() <= 16);
            if let Err(e) = stream().plan(&batch) {
                assert!(matches!(e, BatchError::SeqGap { .. }), "{e}");
            }
        }
    }
    if let Ok(f) = decode_forecast(data, o.inputs, 16) {
        assert_eq!(f.x.len(), f.horizon * o.inputs);
    }
});
