//! Reading a time series from CSV: a header row, a date (or any label) column and one or more
//! numeric columns, quoted or not, LF or CRLF. A bad cell is an error naming its line and
//! column, never a silent skip.

use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The header of the chosen value column.
    pub column: String,
    /// The first column's text per row (dates in the bundled files).
    pub labels: Vec<String>,
    pub values: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line}: malformed CSV: {reason}")]
    Malformed { line: u64, reason: String },
    #[error("line {line}, column `{column}`: {reason}")]
    Cell {
        line: u64,
        column: String,
        reason: String,
    },
    #[error("no column named `{0}` (the header has: {1})")]
    NoSuchColumn(String, String),
    #[error("no numeric column: {0}")]
    NoNumericColumn(String),
    #[error("the file has a header but no data rows")]
    Empty,
}

/// Reads `path`; `column` picks the value column by header name, else the last numeric one.
pub fn read_series(path: &Path, column: Option<&str>) -> Result<Series, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_series(file, column)
}

pub fn parse_series(mut input: impl Read, column: Option<&str>) -> Result<Series, DataError> {
    let mut bytes = Vec::new();
    input
        .read_to_end(&mut bytes)
        .map_err(|source| DataError::Io {
            path: "input".into(),
            source,
        })?;
    // Line numbers come from byte offsets: the csv crate's own line count is off with CRLF,
    // where a record's position is the `\n` that ends the previous line, hence the `+ 1`.
    let line_at = |byte: u64| {
        let end = (byte as usize + 1).min(bytes.len());
        bytes[..end].iter().filter(|&&b| b == b'\n').count() as u64 + 1
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(bytes.as_slice());
    let headers = reader
        .headers()
        .map_err(|e| malformed(&e, &line_at))?
        .iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    let mut records = Vec::new();
    for rec in reader.records() {
        records.push(rec.map_err(|e| malformed(&e, &line_at))?);
    }
    let first = records.first().ok_or(DataError::Empty)?;
    let idx = match column {
        Some(name) => headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| DataError::NoSuchColumn(name.to_owned(), headers.join(", ")))?,
        None => (0..first.len())
            .rev()
            .find(|&i| first.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
            .ok_or_else(|| DataError::NoNumericColumn(headers.join(", ")))?,
    };
    let mut series = Series {
        column: headers.get(idx).cloned().unwrap_or_default(),
        labels: Vec::with_capacity(records.len()),
        values: Vec::with_capacity(records.len()),
    };
    for rec in &records {
        // Counted only for an error: counting lines up to every record is quadratic in the file.
        let line = || rec.position().map_or(0, |p| line_at(p.byte()));
        let cell = rec.get(idx).ok_or_else(|| DataError::Cell {
            line: line(),
            column: series.column.clone(),
            reason: format!(
                "the row has {} fields, the header {}",
                rec.len(),
                headers.len()
            ),
        })?;
        let v: f64 = cell.parse().map_err(|_| DataError::Cell {
            line: line(),
            column: series.column.clone(),
            reason: format!("`{cell}` is not a number"),
        })?;
        if !v.is_finite() {
            return Err(DataError::Cell {
                line: line(),
                column: series.column.clone(),
                reason: format!("`{cell}` is not a finite number"),
            });
        }
        series
            .labels
            .push(rec.get(0).unwrap_or_default().to_owned());
        series.values.push(v);
    }
    Ok(series)
}

fn malformed(e: &csv::Error, line_at: &dyn Fn(u64) -> u64) -> DataError {
    let line = e.position().map_or(0, |p| line_at(p.byte()));
    DataError::Malformed {
        line,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quoted_header_and_crlf() {
        let s = parse_series(
            "\"Date\",\"Temp\"\r\n\"1981-01-01\",20.7\r\n\"1981-01-02\",17.9\r\n".as_bytes(),
            None,
        )
        .unwrap();
        assert_eq!(s.column, "Temp");
        assert_eq!(s.values, vec![20.7, 17.9]);
        assert_eq!(s.labels, vec!["1981-01-01", "1981-01-02"]);
    }

    #[test]
    fn picks_a_named_column_or_the_last_numeric_one() {
        let csv = "date,a,b,note\n2020,1,10,x\n2021,2,20,y\n";
        assert_eq!(
            parse_series(csv.as_bytes(), None).unwrap().values,
            vec![10.0, 20.0]
        );
        assert_eq!(
            parse_series(csv.as_bytes(), Some("a")).unwrap().values,
            vec![1.0, 2.0]
        );
        let e = parse_series(csv.as_bytes(), Some("c")).unwrap_err();
        assert!(e.to_string().contains("no column named `c`"), "{e}");
    }

    #[test]
    fn bad_cells_name_line_and_column() {
        let cases = [
            (
                "d,v\n1,2\n2,abc\n",
                "line 3, column `v`: `abc` is not a number",
            ),
            ("d,v\n1,2\n2,\n", "line 3, column `v`: `` is not a number"),
            (
                "d,v\n1,2\n2,inf\n",
                "line 3, column `v`: `inf` is not a finite number",
            ),
            ("d,v\n1,2\n2,3,4\n", "line 3: malformed CSV"),
            ("d,v\n1,NaN\n", "line 2, column `v`"),
            ("d,v\r\n1,2\r\n2,x\r\n", "line 3, column `v`"),
            ("d,v\r\n1,2\r\n2,3,4\r\n", "line 3: malformed CSV"),
        ];
        for (csv, want) in cases {
            let e = parse_series(csv.as_bytes(), Some("v"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{csv:?}: {e}");
        }
        assert!(matches!(
            parse_series("d,v\n".as_bytes(), None),
            Err(DataError::Empty)
        ));
    }

    #[test]
    fn bundled_datasets_parse_whole() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets");
        for (file, n, max) in [
            ("daily-min-temperatures.csv", 3650, 26.3),
            ("monthly-sunspots.csv", 2820, 253.8),
        ] {
            let s = read_series(&dir.join(file), None).unwrap();
            assert_eq!(s.values.len(), n, "{file}");
            let lo = s.values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = s.values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!((lo, hi), (0.0, max), "{file}");
        }
    }
}
