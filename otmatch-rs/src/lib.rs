//! `otmatch`: the matching engine of otcclip, usable without Python.
//!
//! Cleaning an image–caption dataset by re-pairing means, for every image,
//! finding its best captions among the whole pool ([`topk`]: exact inner
//! product top-k, a GEMM fused with selection, so the N x M score matrix never
//! exists), then choosing one caption per image ([`assign`]: argmax, or a
//! per-caption capacity so that one caption cannot absorb hundreds of images,
//! with a keep-own margin), and remembering who changed across rounds
//! ([`History`]). The `otmatch` binary does the same on `.npy` files.
//!
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod assign;
mod error;
mod history;
mod matrix;
pub mod npy;
mod threads;
mod topk;

pub use assign::{assign, AssignConfig, AssignStats, Assignment, Fallback, Method};
pub use error::{Error, Result};
pub use history::History;
pub use matrix::MatRef;
pub use threads::{max_threads, thread_count, Threads};
pub use topk::{topk, topk_into, Kernel, TopK, TopkConfig};
