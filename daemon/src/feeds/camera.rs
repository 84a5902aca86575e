//! A camera: an ffmpeg child reads whatever ffmpeg reads (RTSP, HTTP, `/dev/videoN` with
//! V4L2, a file, a lavfi test source), samples it at `fps`, scales and converts it to the
//! model's input size and pixel format, and writes raw frames on its stdout.
//!
//! ```text
//!  ffmpeg [input_args] [-f format] -i input -vf fps=F,scale=W:H -pix_fmt P -f rawvideo pipe:1
//!     │ stdout: W*H*C bytes per frame            │ stderr: lines into the log
//!     ▼                                          ▼
//!  read_exact (deadline: stall_secs) ─► Sample::Frame ─► queue (drop oldest)
//! ```
//!
//! ffmpeg dying, exiting or stalling ends the run; the supervisor restarts it with back-off.
//! The child is killed when the feed stops; if ternd itself is killed, ffmpeg exits on its
//! next write into the closed pipe.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use super::queue::Sender;
use super::{Data, Ended, FeedCtx, Sample};
use crate::config::CameraConfig;
use crate::engine::{Input, Manifest, PixelFormat};

/// What the model wants from the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpec {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
}

/// A model a camera cannot feed, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoFrames(pub String);

impl FrameSpec {
    /// The frame a model's image input takes, or why the model takes no images.
    pub fn for_model(m: &Manifest) -> Result<FrameSpec, NoFrames> {
        let (h, w) = m.image_size().ok_or_else(|| {
            NoFrames(format!(
                "model `{}` takes no fixed-size image, so a camera cannot feed it",
                m.name
            ))
        })?;
        let color = m.image().map(|p| p.color).ok_or_else(|| {
            NoFrames(format!(
                "model `{}` declares no image preprocessing",
                m.name
            ))
        })?;
        Ok(FrameSpec {
            width: w as u32,
            height: h as u32,
            format: match color {
                crate::engine::Color::Gray => PixelFormat::Gray8,
                crate::engine::Color::Rgb | crate::engine::Color::Bgr => PixelFormat::Rgb24,
            },
        })
    }

    pub fn bytes(&self) -> usize {
        let c = match self.format {
            PixelFormat::Gray8 => 1,
            PixelFormat::Rgb24 => 3,
        };
        self.width as usize * self.height as usize * c
    }
}

/// ffmpeg's arguments for this camera and frame.
pub fn ffmpeg_args(cfg: &CameraConfig, spec: FrameSpec) -> Vec<String> {
    let mut a = ffmpeg_input(&cfg.input_args, cfg.format.as_deref(), &cfg.input);
    a.extend(["-an".into(), "-sn".into()]);
    let mut vf = Vec::new();
    if let Some(fps) = cfg.fps {
        vf.push(format!("fps={fps}"));
    }
    vf.push(format!("scale={}:{}", spec.width, spec.height));
    a.extend(["-vf".into(), vf.join(",")]);
    let pix = match spec.format {
        PixelFormat::Gray8 => "gray",
        PixelFormat::Rgb24 => "rgb24",
    };
    a.extend(
        ["-pix_fmt", pix, "-f", "rawvideo", "pipe:1"]
            .iter()
            .map(|s| s.to_string()),
    );
    a
}

pub struct CameraFeed {
    pub cfg: CameraConfig,
    pub spec: FrameSpec,
}

impl super::Source for CameraFeed {
    /// One ffmpeg process, from spawn to its end.
    async fn once(&self, ctx: &FeedCtx, tx: &Sender) -> Ended {
        let args = ffmpeg_args(&self.cfg, self.spec);
        let mut child = match spawn_ffmpeg(&self.cfg.ffmpeg, &args, ctx) {
            Ok(c) => c,
            Err(why) => return Ended::Failed(why),
        };
        let mut out = child.stdout.take().expect("stdout is piped");
        let size = self.spec.bytes();
        let why = loop {
            let mut frame = vec![0u8; size];
            match tokio::time::timeout(self.cfg.stall, out.read_exact(&mut frame)).await {
                Err(_) => {
                    break format!(
                        "no frame for {:.1} s: the source stalled",
                        self.cfg.stall.as_secs_f64()
                    );
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // The frame was cut short: ffmpeg ended.
                    break ended(&mut child).await;
                }
                Ok(Err(e)) => break format!("reading frames from ffmpeg: {e}"),
                Ok(Ok(_)) => {}
            }
            ctx.running();
            let sample = Sample::new(
                self.cfg.name.clone(),
                Data::Input(Ok(Input::Frame {
                    width: self.spec.width,
                    height: self.spec.height,
                    format: self.spec.format,
                    data: frame,
                })),
            );
            if tx.send(sample).await.is_err() {
                let _ = child.kill().await;
                return Ended::Stop;
            }
        };
        let _ = child.kill().await;
        Ended::Failed(why)
    }
}

/// ffmpeg's arguments up to its input: quiet, no stdin, the feed's own options, `-f`, `-i`.
pub fn ffmpeg_input(input_args: &[String], format: Option<&str>, input: &str) -> Vec<String> {
    let mut a: Vec<String> = ["-hide_banner", "-nostdin", "-loglevel", "warning"]
        .map(String::from)
        .to_vec();
    a.extend(input_args.iter().cloned());
    if let Some(f) = format {
        a.extend(["-f".into(), f.to_string()]);
    }
    a.extend(["-i".into(), input.to_string()]);
    a
}

/// An ffmpeg child with `args`: stdout piped for the caller, stderr's lines into the log (the
/// last one kept for [`ended`]), killed when dropped.
pub fn spawn_ffmpeg(ffmpeg: &Path, args: &[String], ctx: &FeedCtx) -> Result<Ffmpeg, String> {
    let mut child = Command::new(ffmpeg)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ffmpeg.display()))?;
    tracing::debug!(pipeline = %ctx.pipeline, pid = child.id(), args = ?args, "ffmpeg started");
    let last_err = Arc::new(Mutex::new(String::new()));
    if let Some(err) = child.stderr.take() {
        let (last, pipeline) = (last_err.clone(), ctx.pipeline.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::warn!(pipeline = %pipeline, "ffmpeg: {line}");
                *last.lock().unwrap_or_else(|e| e.into_inner()) = line;
            }
        });
    }
    Ok(Ffmpeg {
        child,
        last_err,
        stdout: None,
    }
    .piped())
}

/// A running ffmpeg and the last line it said.
pub struct Ffmpeg {
    child: tokio::process::Child,
    last_err: Arc<Mutex<String>>,
    pub stdout: Option<tokio::process::ChildStdout>,
}

impl Ffmpeg {
    fn piped(mut self) -> Ffmpeg {
        self.stdout = self.child.stdout.take();
        self
    }

    pub async fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill().await
    }
}

/// Why ffmpeg's output ended: its exit status and last words.
pub async fn ended(f: &mut Ffmpeg) -> String {
    let status = match tokio::time::timeout(std::time::Duration::from_secs(2), f.child.wait()).await
    {
        Ok(Ok(s)) => s.to_string(),
        _ => "no exit status".into(),
    };
    let last = f.last_err.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if last.is_empty() {
        format!("ffmpeg ended ({status})")
    } else {
        format!("ffmpeg ended ({status}): {last}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_put_input_options_first_and_scale_to_the_model() {
        let cfg = CameraConfig {
            name: "cam".into(),
            input: "testsrc=size=64x48:rate=10".into(),
            format: Some("lavfi".into()),
            input_args: vec!["-re".into()],
            fps: Some(5.0),
            stall: std::time::Duration::from_secs(3),
            ffmpeg: "ffmpeg".into(),
        };
        let spec = FrameSpec {
            width: 32,
            height: 16,
            format: PixelFormat::Gray8,
        };
        let a = ffmpeg_args(&cfg, spec).join(" ");
        assert!(
            a.contains("-re -f lavfi -i testsrc=size=64x48:rate=10 "),
            "{a}"
        );
        assert!(
            a.ends_with("-vf fps=5,scale=32:16 -pix_fmt gray -f rawvideo pipe:1"),
            "{a}"
        );
        assert_eq!(spec.bytes(), 512);
    }
}
