//! The one error type of the crate.

use std::fmt;

/// Why a call was refused. Every variant carries a message that names what was
/// expected, so that the CLI and the Python binding can show it as is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// An argument is out of its domain, or two arrays disagree in shape.
    InvalidInput(String),
    /// The data holds NaN or infinity, or would overflow `f32`: no answer
    /// computed from it could be trusted, so none is given.
    NonFinite(String),
    /// Serialised bytes (a [`crate::History`]) are truncated or not ours.
    Corrupt(String),
    /// The operating system refused to start worker threads.
    ThreadPool(String),
}

impl Error {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(m) | Error::NonFinite(m) | Error::Corrupt(m) => f.write_str(m),
            Error::ThreadPool(m) => write!(f, "could not start worker threads: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
