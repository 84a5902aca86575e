//! Sound: an ffmpeg child reads whatever ffmpeg reads (an ALSA or PulseAudio device, a file,
//! a stream), mixes it to mono, resamples it to the model's rate and writes 16-bit samples on
//! its stdout, which become the pipeline's stream of samples.
//!
//! ```text
//!  ffmpeg [input_args] [-f format] -i input -vn -ac 1 -ar RATE -f s16le pipe:1
//!     │ stdout: samples, in the pieces the pipe gives  │ stderr: lines into the log
//!     ▼                                               ▼
//!  read (deadline: stall_secs) ─► Sample::Pcm ─► queue ─► the pipeline's windows
//! ```
//!
//! The same child handling as a camera: ffmpeg dying, ending or stalling ends the run, the
//! supervisor starts it again with back-off, and the pipeline's streams start over.

use tokio::io::AsyncReadExt;

use super::queue::Sender;
use super::{Data, Ended, FeedCtx, Sample};
use crate::config::AudioConfig;
use crate::engine::{Pcm, pcm_stream};

/// ffmpeg's arguments for this feed at `rate` samples per second.
pub fn ffmpeg_args(cfg: &AudioConfig, rate: u32) -> Vec<String> {
    let mut a = super::camera::ffmpeg_input(&cfg.input_args, cfg.format.as_deref(), &cfg.input);
    a.extend(
        [
            "-vn",
            "-sn",
            "-ac",
            "1",
            "-ar",
            &rate.to_string(),
            "-f",
            "s16le",
            "pipe:1",
        ]
        .map(String::from),
    );
    a
}

pub struct AudioFeed {
    pub cfg: AudioConfig,
    /// The model's samples per second.
    pub rate: u32,
}

impl super::Source for AudioFeed {
    /// One ffmpeg process, from spawn to its end.
    async fn once(&self, ctx: &FeedCtx, tx: &Sender) -> Ended {
        let args = ffmpeg_args(&self.cfg, self.rate);
        let mut child = match super::camera::spawn_ffmpeg(&self.cfg.ffmpeg, &args, ctx) {
            Ok(c) => c,
            Err(why) => return Ended::Failed(why),
        };
        if tx
            .send(Sample::new(self.cfg.name.clone(), Data::Restart))
            .await
            .is_err()
        {
            return Ended::Stop;
        }
        let mut out = child.stdout.take().expect("stdout is piped");
        let mut rest = Vec::new();
        // About 20 ms of sound per read at most: fresh samples go on at once.
        let mut buf = vec![0u8; (self.rate as usize / 50).max(64) * 2];
        let why = loop {
            let n = match tokio::time::timeout(self.cfg.stall, out.read(&mut buf)).await {
                Err(_) => {
                    break format!(
                        "no sound for {:.1} s: the source stalled",
                        self.cfg.stall.as_secs_f64()
                    );
                }
                Ok(Ok(0)) => break super::camera::ended(&mut child).await,
                Ok(Ok(n)) => n,
                Ok(Err(e)) => break format!("reading sound from ffmpeg: {e}"),
            };
            ctx.running();
            let samples = pcm_stream(&buf[..n], Pcm::S16le, &mut rest);
            if samples.is_empty() {
                continue;
            }
            let sample = Sample::new(self.cfg.name.clone(), Data::Pcm(samples));
            if tx.send(sample).await.is_err() {
                let _ = child.kill().await;
                return Ended::Stop;
            }
        };
        let _ = child.kill().await;
        Ended::Failed(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_put_input_options_first_and_ask_for_mono_at_the_models_rate() {
        let cfg = AudioConfig {
            name: "mic".into(),
            input: "speech.wav".into(),
            format: None,
            input_args: vec!["-re".into()],
            stall: std::time::Duration::from_secs(5),
            ffmpeg: "ffmpeg".into(),
        };
        let a = ffmpeg_args(&cfg, 16000).join(" ");
        assert!(a.contains("-re -i speech.wav "), "{a}");
        assert!(
            a.ends_with("-vn -sn -ac 1 -ar 16000 -f s16le pipe:1"),
            "{a}"
        );
    }
}
