//! `ekid eval --plot OUT.svg`: the series and the prequential predictions of the written EKI
//! run, in the user's units, with the train/test split marked.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

/// Draws `values` (grey) and `predictions` (blue, gaps while the lag buffer fills) over the row
/// number, with a dashed line at `split` (the first test row).
pub fn write_svg(
    path: &Path,
    title: &str,
    values: &[f64],
    predictions: &[Option<f64>],
    split: usize,
) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let root = SVGBackend::new(path, (1400, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let all = values
        .iter()
        .copied()
        .chain(predictions.iter().flatten().copied());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    };
    let pad = 0.05 * (hi - lo);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(1f64..values.len().max(2) as f64, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seq (row of the file)")
        .y_desc("value")
        .draw()
        .map_err(|e| err(&e))?;
    let grey = RGBColor(150, 150, 150);
    chart
        .draw_series(LineSeries::new(
            values.iter().enumerate().map(|(i, &v)| ((i + 1) as f64, v)),
            grey.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("observed")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey));
    let points: Vec<(f64, f64)> = predictions
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| ((i + 1) as f64, p)))
        .collect();
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(1)))
        .map_err(|e| err(&e))?
        .label("prequential prediction (EKI mean particle)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    let x = (split + 1) as f64;
    chart
        .draw_series(DashedLineSeries::new(
            [(x, lo - pad), (x, hi + pad)],
            6,
            4,
            RED.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("train | test split")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
