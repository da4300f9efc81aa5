//! Decoding observation bodies (JSON object or array, NDJSON, CSV) into [`Observation`]s.
//! Pure functions over bytes: no stream state is touched until the whole body has decoded.

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::engine::Observation;

/// Why a body did not decode; `line` is 1-based for NDJSON and CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub detail: String,
    pub line: Option<u64>,
    pub field: Option<String>,
}

impl DecodeError {
    fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
            line: None,
            field: None,
        }
    }
    fn at_line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }
    fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

/// A number or an array of numbers (`"y": 1.5` and `"y": [1.5]` mean the same).
#[derive(Debug, Clone, PartialEq)]
pub struct Values(pub Vec<f64>);

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Values;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or an array of numbers")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Values, E> {
                Ok(Values(vec![v]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Values, E> {
                Ok(Values(vec![v as f64]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Values, E> {
                Ok(Values(vec![v as f64]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(1024));
                while let Some(v) = seq.next_element::<f64>()? {
                    out.push(v);
                }
                Ok(Values(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One observation object as JSON carries it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationIn {
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub x: Option<Values>,
    pub y: Values,
}

impl From<ObservationIn> for Observation {
    fn from(o: ObservationIn) -> Self {
        Observation {
            seq: o.seq,
            x: o.x.map(|v| v.0).unwrap_or_default(),
            y: o.y.0,
        }
    }
}

/// The field a serde_json message names (`unknown field `z``, `missing field `y``).
pub(crate) fn field_of(msg: &str) -> Option<String> {
    if !(msg.starts_with("unknown field")
        || msg.starts_with("missing field")
        || msg.starts_with("duplicate field"))
    {
        return None;
    }
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_owned())
}

/// Decodes JSON, naming the path of whatever failed (`[3].y`, `step.eps`).
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let value = result.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let named = field_of(&msg);
        // The path ends at an unknown field, but stops at the parent of a missing one.
        let field = match (path.as_str(), named) {
            ("." | "", f) => f,
            (p, Some(f)) if !p.ends_with(f.as_str()) => Some(format!("{p}.{f}")),
            (p, _) => Some(p.to_owned()),
        };
        DecodeError {
            detail: format!("malformed JSON: {msg}"),
            line: (inner.line() > 0).then_some(inner.line() as u64),
            field,
        }
    })?;
    de.end()
        .map_err(|e| DecodeError::new(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// `application/json`: one object or an array of objects.
pub fn decode_json(body: &[u8]) -> Result<Vec<Observation>, DecodeError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(DecodeError::new(
            "empty body: expected a JSON object or array",
        )),
        Some(b'[') => from_json::<Vec<ObservationIn>>(body)
            .map(|v| v.into_iter().map(Observation::from).collect()),
        Some(b'{') => from_json::<ObservationIn>(body).map(|o| vec![o.into()]),
        Some(_) => Err(DecodeError::new(
            "expected a JSON object or an array of objects",
        )),
    }
}

/// `application/x-ndjson`: one object per line; blank lines are skipped.
pub fn decode_ndjson(body: &[u8]) -> Result<Vec<Observation>, DecodeError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError::new(format!("body is not UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let o: ObservationIn = from_json(line.as_bytes()).map_err(|mut d| {
            d.detail = format!("line {}: {}", i + 1, d.detail);
            d.at_line(i as u64 + 1)
        })?;
        out.push(o.into());
    }
    if out.is_empty() {
        return Err(DecodeError::new(
            "empty body: expected one JSON object per line",
        ));
    }
    Ok(out)
}

/// Which CSV column feeds what.
enum Column {
    Seq,
    Y(usize),
    X(usize),
}

/// Parses `y`, `y1`, `y2`, … (and likewise `x…`) into a 0-based index.
fn indexed(name: &str, prefix: char) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    if rest.is_empty() {
        return Some(0);
    }
    rest.parse::<usize>()
        .ok()
        .filter(|&n| n >= 1)
        .map(|n| n - 1)
}

/// `text/csv`: a header row naming `y` (or `y1`, `y2`, …), optional `x` (or `x1`, …) and an
/// optional `seq`; every other column is an error.
pub fn decode_csv(body: &[u8]) -> Result<Vec<Observation>, DecodeError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| DecodeError::new(format!("malformed CSV header: {e}")).at_line(1))?
        .clone();
    let mut columns = Vec::with_capacity(headers.len());
    let (mut ny, mut nx) = (0usize, 0usize);
    for h in headers.iter() {
        let c = if h == "seq" {
            Column::Seq
        } else if let Some(i) = indexed(h, 'y') {
            ny = ny.max(i + 1);
            Column::Y(i)
        } else if let Some(i) = indexed(h, 'x') {
            nx = nx.max(i + 1);
            Column::X(i)
        } else {
            return Err(DecodeError::new(format!(
                "unknown column `{h}`: expected `seq`, `y` or `y1..`, `x` or `x1..`"
            ))
            .at_line(1)
            .field(h));
        };
        columns.push(c);
    }
    if ny == 0 {
        return Err(DecodeError::new("the header has no `y` column")
            .at_line(1)
            .field("y"));
    }
    // Indices must run 1..=k without gaps or repeats (and so are bounded by the header's
    // length: a header `y999999999` must not size anything).
    for (prefix, n) in [('y', ny), ('x', nx)] {
        let mut seen = vec![false; n.min(headers.len())];
        for (c, h) in columns.iter().zip(headers.iter()) {
            let i = match (c, prefix) {
                (Column::Y(i), 'y') | (Column::X(i), 'x') => *i,
                _ => continue,
            };
            match seen.get_mut(i) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(DecodeError::new(format!(
                        "column `{h}` repeats or skips an index: `{prefix}` columns must be `{prefix}` or `{prefix}1`..`{prefix}k`"
                    ))
                    .at_line(1)
                    .field(h));
                }
            }
        }
        if seen.len() < n || seen.iter().any(|s| !s) {
            return Err(DecodeError::new(format!(
                "the `{prefix}` columns skip an index: they must be `{prefix}` or `{prefix}1`..`{prefix}k`"
            ))
            .at_line(1)
            .field(prefix.to_string()));
        }
    }
    let mut out = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let line = i as u64 + 2;
        let rec = rec.map_err(|e| {
            DecodeError::new(format!("line {line}: malformed CSV: {e}")).at_line(line)
        })?;
        let mut o = Observation {
            seq: None,
            x: vec![f64::NAN; nx],
            y: vec![f64::NAN; ny],
        };
        for (cell, (col, name)) in rec.iter().zip(columns.iter().zip(headers.iter())) {
            let bad = |what: &str| {
                DecodeError::new(format!(
                    "line {line}, column `{name}`: `{cell}` is not {what}"
                ))
                .at_line(line)
                .field(name)
            };
            match col {
                Column::Seq if cell.is_empty() => {}
                Column::Seq => o.seq = Some(cell.parse().map_err(|_| bad("a sequence number"))?),
                Column::Y(k) => o.y[*k] = cell.parse().map_err(|_| bad("a number"))?,
                Column::X(k) => o.x[*k] = cell.parse().map_err(|_| bad("a number"))?,
            }
        }
        out.push(o);
    }
    if out.is_empty() {
        return Err(DecodeError::new("the CSV has a header but no rows"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_object_array_and_scalar_or_vector_values() {
        let one = decode_json(br#"{"y": 12.5}"#).unwrap();
        assert_eq!(
            one,
            vec![Observation {
                seq: None,
                x: vec![],
                y: vec![12.5]
            }]
        );
        let many = decode_json(br#"[{"y": [1, 2], "x": [3], "seq": 4}, {"y": 5}]"#).unwrap();
        assert_eq!(
            many[0],
            Observation {
                seq: Some(4),
                x: vec![3.0],
                y: vec![1.0, 2.0]
            }
        );
        assert_eq!(many[1].y, vec![5.0]);
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = decode_json(br#"{"y": 1, "z": 2}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("z"));
        let e = decode_json(br#"{"x": [1]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("y"));
        let e = decode_json(br#"[{"y": 1}, {"y": [1, "a"]}]"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("[1].y[1]"));
        let e = decode_json(br#"[{"y": 1}, {"x": [1]}]"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("[1].y"));
        assert!(decode_json(br#"{"y": 1e400}"#).is_err());
        assert!(decode_json(br#"{"y": "a"}"#).is_err());
        assert!(decode_json(b"").is_err());
        assert!(decode_json(b"42").is_err());
    }

    #[test]
    fn ndjson_reports_the_line() {
        let ok = decode_ndjson(b"{\"y\": 1}\n\n{\"y\": 2}\n").unwrap();
        assert_eq!(ok.len(), 2);
        let e = decode_ndjson(b"{\"y\": 1}\n{\"y\": }\n").unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn csv_columns_and_errors() {
        let ok = decode_csv(b"seq,y1,y2,x\n1,1.5,2.5,0.1\n,3,4,0.2\n").unwrap();
        assert_eq!(
            ok[0],
            Observation {
                seq: Some(1),
                x: vec![0.1],
                y: vec![1.5, 2.5]
            }
        );
        assert_eq!(ok[1].seq, None);
        let e = decode_csv(b"y\n1\nabc\n").unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("y")));
        let e = decode_csv(b"date,y\n2020,1\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("date"));
        assert!(decode_csv(b"x\n1\n").is_err());
        for bad in [
            "y,y1\n1,2\n",
            "y2\n1\n",
            "y1,y3\n1,2\n",
            "y1,x2\n1,2\n",
            "y,y\n1,2\n",
        ] {
            assert!(decode_csv(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(decode_csv(b"y\n").is_err());
    }

    /// Found by `cargo fuzz`: a header index sized a vector (`y121599999999999999`).
    #[test]
    fn csv_column_index_beyond_the_header_is_refused_issue_5() {
        let e = decode_csv(b"\ny121599999999999999\n\x0b\0\0\0\0\0\0\0").unwrap_err();
        assert_eq!(e.line, Some(1));
        let e = decode_csv(b"y1000000000000\n1\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("y1000000000000"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn observation(m: usize, n: usize) -> impl Strategy<Value = Observation> {
            (
                proptest::option::of(1u64..1_000_000),
                proptest::collection::vec(-1e12f64..1e12, n),
                proptest::collection::vec(-1e12f64..1e12, m),
            )
                .prop_map(|(seq, x, y)| Observation { seq, x, y })
        }

        fn batch() -> impl Strategy<Value = Vec<Observation>> {
            (1usize..4, 0usize..3)
                .prop_flat_map(|(m, n)| proptest::collection::vec(observation(m, n), 1..20))
        }

        fn json(o: &Observation) -> String {
            serde_json::json!({"seq": o.seq, "x": o.x, "y": o.y}).to_string()
        }

        fn csv(b: &[Observation]) -> String {
            let (m, n) = (b[0].y.len(), b[0].x.len());
            let mut head = vec!["seq".to_owned()];
            head.extend((1..=m).map(|i| format!("y{i}")));
            head.extend((1..=n).map(|i| format!("x{i}")));
            let mut out = head.join(",") + "\n";
            for o in b {
                let mut row = vec![o.seq.map_or(String::new(), |s| s.to_string())];
                row.extend(o.y.iter().map(f64::to_string));
                row.extend(o.x.iter().map(f64::to_string));
                out += &(row.join(",") + "\n");
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode_json(&bytes);
                let _ = decode_ndjson(&bytes);
                let _ = decode_csv(&bytes);
            }

            #[test]
            fn valid_batches_round_trip_in_every_format(b in batch()) {
                let array = format!("[{}]", b.iter().map(json).collect::<Vec<_>>().join(","));
                prop_assert_eq!(&decode_json(array.as_bytes()).unwrap(), &b);
                let nd: String = b.iter().map(|o| json(o) + "\n").collect();
                prop_assert_eq!(&decode_ndjson(nd.as_bytes()).unwrap(), &b);
                prop_assert_eq!(&decode_csv(csv(&b).as_bytes()).unwrap(), &b);
            }

            #[test]
            fn mutated_valid_bodies_never_panic(b in batch(), cuts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
                for text in [format!("[{}]", b.iter().map(json).collect::<Vec<_>>().join(",")), csv(&b)] {
                    let mut bytes = text.into_bytes();
                    for (at, v) in &cuts {
                        if bytes.is_empty() { break; }
                        let i = at % bytes.len();
                        if v % 3 == 0 { bytes.remove(i); } else { bytes[i] = *v; }
                    }
                    let _ = decode_json(&bytes);
                    let _ = decode_ndjson(&bytes);
                    let _ = decode_csv(&bytes);
                }
            }
        }
    }
}
