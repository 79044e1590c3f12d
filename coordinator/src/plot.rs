//! Line charts of a run's metrics (`rlhf plot`, the quickstart's `curves.png`), drawn with
//! plotters to PNG or SVG (by the file's extension).
//!
//! Text needs a TrueType font: `RLHF_PLOT_FONT`, else DejaVu Sans or Liberation Sans from the
//! usual system folders (Debian: `apt-get install fonts-dejavu-core`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line (or set of points) on a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Index into the palette: series of one arm share a colour.
    pub color: usize,
    /// Draw markers at the points (for scatter-like data) as well as the line.
    pub markers: bool,
}

/// One chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a system font with plotters once per process.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("RLHF_PLOT_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
            .collect();
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            format!(
                "no TrueType font found for the chart's text: set RLHF_PLOT_FONT to a .ttf file \
                 or install one (Debian: apt-get install fonts-dejavu-core); looked in {}",
                FONT_CANDIDATES.join(", ")
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType font", path.display()))?;
        Ok(path.clone())
    });
    found.as_ref().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

fn draw_error(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

/// Draws `panels` in a grid of `columns` into `path` (`.png` or `.svg`).
pub fn draw(panels: &[Panel], columns: usize, path: &Path) -> Result<()> {
    ensure_font()?;
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let size = (560 * columns as u32, 400 * rows as u32);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_grid(&root, panels, rows, columns)?;
            root.present().map_err(draw_error)
        }
        Some("svg") => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_grid(&root, panels, rows, columns)?;
            root.present().map_err(draw_error)
        }
        _ => bail!(
            "{}: the chart's file name must end in .png or .svg",
            path.display()
        ),
    }
    .with_context(|| format!("writing {}", path.display()))
}

fn draw_grid<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    rows: usize,
    columns: usize,
) -> Result<()> {
    root.fill(&WHITE).map_err(draw_error)?;
    for (area, panel) in root.split_evenly((rows, columns)).iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    Ok(())
}

/// The padded range of finite values.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * lo.abs().max(1.0));
    (lo - pad, hi + pad)
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> Result<()> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(finite))
    };
    let x = range(all().map(|p| p.0));
    let y = range(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .x_labels(6)
        .y_labels(6)
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_error)?;
    let mut labelled = false;
    for s in &panel.series {
        let color = PALETTE[s.color % PALETTE.len()];
        let points: Vec<(f64, f64)> = s.points.iter().filter(finite).copied().collect();
        let line = chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(draw_error)?;
        if !s.label.is_empty() {
            labelled = true;
            line.label(s.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        if s.markers {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_error)?;
        }
    }
    if labelled {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(draw_error)?;
    }
    Ok(())
}

/// A run's per-step metrics (`metrics.jsonl`): metric name → (step, value) points.
pub type MetricSeries = BTreeMap<String, Vec<(f64, f64)>>;

/// Reads `metrics.jsonl`; a malformed line is an error naming the file and line.
pub fn read_metrics(path: &Path) -> Result<MetricSeries> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = MetricSeries::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let step = value
            .get("step")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| anyhow!("{}:{}: no numeric `step`", path.display(), i + 1))?;
        // Lines of a pipeline's merged file carry their arm and seed: one series per run.
        let tag = match (value["arm"].as_str(), value["seed"].as_u64()) {
            (Some(arm), Some(seed)) => format!(" [{arm} s{seed}]"),
            _ => String::new(),
        };
        for (k, v) in value.as_object().into_iter().flatten() {
            if let (false, Some(v)) = (["step", "seed"].contains(&k.as_str()), v.as_f64()) {
                out.entry(format!("{k}{tag}")).or_default().push((step, v));
            }
        }
    }
    Ok(out)
}

/// Panels for `rlhf plot`: rewards per objective (raw and transformed), KL and its coefficient,
/// losses, and evaluation metrics, each against the step. Panels without data are left out.
pub fn metric_panels(metrics: &MetricSeries) -> Vec<Panel> {
    let pick = |title: &str, keep: &dyn Fn(&str) -> bool| Panel {
        title: title.to_string(),
        x_label: "step".into(),
        series: metrics
            .iter()
            .filter(|(k, _)| keep(k.split(" [").next().unwrap_or(k)))
            .enumerate()
            .map(|(i, (k, points))| Series {
                label: k.clone(),
                points: points.clone(),
                color: i,
                markers: points.len() < 12,
            })
            .collect(),
    };
    let reward = |kind: &'static str| move |k: &str| k.starts_with("reward/") && k.ends_with(kind);
    [
        pick("raw reward per objective", &reward("/raw")),
        pick("transformed reward per objective", &reward("/transformed")),
        pick("combined reward", &|k| k == "reward/total"),
        pick("KL to the reference", &|k| {
            k == "kl/sequence" || k == "kl/token"
        }),
        pick("KL coefficient β", &|k| k == "kl/beta"),
        pick("losses", &|k| k == "train/loss" || k == "critic/value_loss"),
        pick("policy entropy", &|k| k == "train/entropy"),
        pick("evaluation", &|k| {
            k.starts_with("eval/") && k != "eval/length"
        }),
        pick("evaluation length (tokens)", &|k| k == "eval/length"),
    ]
    .into_iter()
    .filter(|p| !p.series.is_empty())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_become_panels_and_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics.jsonl");
        std::fs::write(
            &file,
            "{\"step\":1,\"reward/a/raw\":0.1,\"kl/sequence\":0.0,\"kl/beta\":0.1,\"train/loss\":1.0}\n\
             {\"step\":2,\"reward/a/raw\":0.3,\"kl/sequence\":0.2,\"kl/beta\":0.1,\"train/loss\":0.5}\n",
        )
        .unwrap();
        let metrics = read_metrics(&file).unwrap();
        assert_eq!(metrics["reward/a/raw"], vec![(1.0, 0.1), (2.0, 0.3)]);
        let panels = metric_panels(&metrics);
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "raw reward per objective",
                "KL to the reference",
                "KL coefficient β",
                "losses"
            ]
        );
        for name in ["c.png", "c.svg"] {
            let out = dir.path().join(name);
            draw(&panels, 2, &out).unwrap();
            assert!(std::fs::metadata(&out).unwrap().len() > 1000, "{name}");
        }
        let err = draw(&panels, 2, &dir.path().join("c.gif")).unwrap_err();
        assert!(err.to_string().contains(".png or .svg"), "{err}");
    }

    #[test]
    fn bad_metric_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics.jsonl");
        std::fs::write(&file, "{\"step\":1}\nnot json\n").unwrap();
        let err = format!("{:#}", read_metrics(&file).unwrap_err());
        assert!(err.contains("metrics.jsonl:2"), "{err}");
    }
}
