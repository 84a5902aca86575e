//! End-to-end tests: the real `ternd` binary, real model packages, real files and signals.

mod arm;
mod check_config;
mod cluster;
mod daemon;
mod dbus;
mod drift;
mod feeds;
mod first_hour;
mod fleet;
mod hardening;
mod home_assistant;
mod infer;
mod ocr;
mod package;
mod rollout;
mod shadow;
mod sound;
mod systemd;
mod ternctl;
mod third_party;
mod updates;
