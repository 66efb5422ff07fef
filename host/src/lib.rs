//! Pith, the host: the training loop, devices, the model and the plugin registry.
//! Each module is one concept; AGENTS.md has the map.

pub mod bench;
pub mod check;
pub mod check_cuda;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod data;
pub mod decoder;
pub mod dist;
pub mod gpu;
pub mod hf;
pub mod layers;
pub mod model;
pub mod parallel;
pub mod params;
pub mod plan;
pub mod registry;
pub mod report;
pub mod rng;
pub mod rundir;
pub mod runs;
pub mod scaffold;
pub mod tensorboard;
pub mod trace;
pub mod train;
