//! A serial sensor: lines of CSV or JSON on a port (tokio-serial), each parsed into the
//! feed's named numeric fields; or a stream of PCM samples (`s16le`, `f32le`), a microphone or
//! a vibration sensor, taken in whatever pieces the port gives.
//!
//! Sensors babble: a line that is not a reading (a banner, a half line after a reconnect,
//! noise) or is longer than `max_line_bytes` is counted and skipped, never fatal. A port that
//! cannot be opened or stops reading (unplugged, the other end of a pty closed) is reopened
//! with back-off.

use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;

use super::queue::Sender;
use super::{Data, Ended, FeedCtx, Sample};
use crate::config::{LineFormat, Parity, SerialConfig};

pub struct SerialFeed {
    pub cfg: SerialConfig,
}

impl super::Source for SerialFeed {
    async fn once(&self, ctx: &FeedCtx, tx: &Sender) -> Ended {
        let c = &self.cfg;
        let path = c.path.to_string_lossy().to_string();
        let mut port = match tokio_serial::new(&path, c.baud)
            .data_bits(match c.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match c.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .stop_bits(if c.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .open_native_async()
        {
            Ok(p) => p,
            Err(e) => return Ended::Failed(format!("cannot open {path}: {e}")),
        };
        ctx.running();
        if tx
            .send(Sample::new(c.name.clone(), Data::Restart))
            .await
            .is_err()
        {
            return Ended::Stop;
        }
        let pcm = match c.format {
            LineFormat::S16le => Some(crate::engine::Pcm::S16le),
            LineFormat::F32le => Some(crate::engine::Pcm::F32le),
            _ => None,
        };
        let mut lines = Lines::new(c.max_line_bytes);
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match port.read(&mut buf).await {
                Ok(0) => return Ended::Failed(format!("{path} closed")),
                Ok(n) => n,
                Err(e) => return Ended::Failed(format!("reading {path}: {e}")),
            };
            if let Some(pcm) = pcm {
                let samples = crate::engine::pcm_stream(&buf[..n], pcm, &mut rest);
                if !samples.is_empty()
                    && tx
                        .send(Sample::new(c.name.clone(), Data::Pcm(samples)))
                        .await
                        .is_err()
                {
                    return Ended::Stop;
                }
                continue;
            }
            for line in lines.push(&buf[..n]) {
                let values = match line {
                    Line::TooLong => {
                        ctx.garbage(&format!("a line over {} bytes", c.max_line_bytes));
                        continue;
                    }
                    Line::Text(t) if t.trim().is_empty() => continue,
                    Line::Text(t) => match parse_reading(&t, c.format, &c.fields) {
                        Ok(v) => v,
                        Err(why) => {
                            ctx.garbage(&why);
                            continue;
                        }
                    },
                };
                if tx
                    .send(Sample::new(c.name.clone(), Data::Reading(values)))
                    .await
                    .is_err()
                {
                    return Ended::Stop;
                }
            }
        }
    }
}

/// Splits a byte stream into lines of at most `max` bytes; longer lines are reported as such
/// (once) and their bytes dropped, so a sensor without newlines cannot grow memory.
pub struct Lines {
    buf: Vec<u8>,
    max: usize,
    overlong: bool,
}

#[derive(Debug, PartialEq)]
pub enum Line {
    Text(String),
    TooLong,
}

impl Lines {
    pub fn new(max: usize) -> Lines {
        Lines {
            buf: Vec::new(),
            max,
            overlong: false,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if self.overlong {
                    out.push(Line::TooLong);
                } else {
                    let text = String::from_utf8_lossy(&self.buf);
                    out.push(Line::Text(text.trim_end_matches('\r').to_string()));
                }
                self.buf.clear();
                self.overlong = false;
            } else if self.buf.len() >= self.max {
                self.overlong = true;
                self.buf.clear();
            } else if !self.overlong {
                self.buf.push(b);
            }
        }
        out
    }
}

/// The fields of one reading, in the configured order.
pub fn parse_reading(
    text: &str,
    format: LineFormat,
    fields: &[String],
) -> Result<Vec<f32>, String> {
    let short = |t: &str| t.chars().take(60).collect::<String>();
    let json = match format {
        LineFormat::Auto => text.trim_start().starts_with('{'),
        f => f == LineFormat::Json,
    };
    match json {
        false => {
            let cols: Vec<&str> = text.split(',').map(str::trim).collect();
            if cols.len() != fields.len() {
                return Err(format!(
                    "`{}`: {} values, expected {} ({})",
                    short(text),
                    cols.len(),
                    fields.len(),
                    fields.join(",")
                ));
            }
            cols.iter()
                .zip(fields)
                .map(|(c, f)| number(c.parse::<f64>().ok(), f, text))
                .collect()
        }
        true => json_reading(text.as_bytes(), fields),
    }
}

/// A JSON object with a number under each field name.
pub fn json_reading(bytes: &[u8], fields: &[String]) -> Result<Vec<f32>, String> {
    let text = String::from_utf8_lossy(bytes);
    let short: String = text.chars().take(60).collect();
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("`{short}`: not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("`{short}`: not a JSON object"))?;
    fields
        .iter()
        .map(|f| match obj.get(f) {
            None => Err(format!("`{short}`: no field `{f}`")),
            Some(x) => number(x.as_f64(), f, &short),
        })
        .collect()
}

fn number(v: Option<f64>, field: &str, text: &str) -> Result<f32, String> {
    match v {
        Some(x) if x.is_finite() && x.abs() <= f32::MAX as f64 => Ok(x as f32),
        _ => Err(format!(
            "`{}`: field `{field}` is not a finite number",
            text.chars().take(60).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lines_split_across_reads_and_overlong_lines_are_reported_once() {
        let mut l = Lines::new(8);
        assert_eq!(l.push(b"1,2"), vec![]);
        assert_eq!(l.push(b",3\r\nabc"), vec![Line::Text("1,2,3".into())]);
        let long = l.push(b"defghijklmnop\nok\n");
        assert_eq!(long, vec![Line::TooLong, Line::Text("ok".into())]);
    }

    #[test]
    fn readings_parse_from_csv_and_json_and_garbage_is_named() {
        let f = names(&["a", "b"]);
        assert_eq!(
            parse_reading(" 1.5, -2", LineFormat::Csv, &f).unwrap(),
            [1.5, -2.0]
        );
        assert_eq!(
            parse_reading(r#"{"b": 2, "a": 1, "c": "x"}"#, LineFormat::Json, &f).unwrap(),
            [1.0, 2.0]
        );
        let e = parse_reading("1,2,3", LineFormat::Csv, &f).unwrap_err();
        assert!(e.contains("3 values, expected 2"), "{e}");
        let e = parse_reading("1,nan", LineFormat::Csv, &f).unwrap_err();
        assert!(e.contains("field `b`"), "{e}");
        let e = parse_reading(r#"{"a": 1}"#, LineFormat::Json, &f).unwrap_err();
        assert!(e.contains("no field `b`"), "{e}");
        let e = parse_reading("#garbage", LineFormat::Json, &f).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        assert_eq!(
            parse_reading(r#"{"a": 3, "b": 4}"#, LineFormat::Auto, &f).unwrap(),
            [3.0, 4.0]
        );
        assert_eq!(
            parse_reading("5,6", LineFormat::Auto, &f).unwrap(),
            [5.0, 6.0]
        );
        let e = parse_reading("1e99,1", LineFormat::Csv, &f).unwrap_err();
        assert!(e.contains("field `a`"), "{e}");
    }
}
