//! The one error type of the core. Every variant carries the offending input and a hint at the fix,
//! because the bindings turn these messages straight into Python exceptions.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// A memory size string or number that cannot be read.
    #[error("invalid memory size {input:?}: {reason}. Use an integer number of bytes or a number with a unit, e.g. \"20GiB\", \"512MiB\", \"1.5GB\"")]
    InvalidSize { input: String, reason: String },

    /// A device key that is not a GPU index, "mps", "cpu" or "disk".
    #[error("unknown device {key:?}: {hint}")]
    UnknownDevice { key: String, hint: String },

    /// A module or tensor name (in pins or options) that the tree does not contain.
    #[error("unknown module {name:?} in {context}{suggestion}")]
    UnknownModule {
        name: String,
        context: String,
        suggestion: String,
    },

    /// Tied parameters (one storage under several names) that pins send to different devices.
    #[error("tied parameters {names:?} share one storage but are pinned to different devices ({devices}); pin them to the same device or pin only one of them")]
    TiedPinConflict { names: Vec<String>, devices: String },

    /// Two pins that contradict each other (a module inside a no-split block pinned elsewhere).
    #[error("conflicting pins: {detail}")]
    PinConflict { detail: String },

    /// The model does not fit on the given devices.
    #[error("the model does not fit: {detail}")]
    DoesNotFit { detail: String },

    /// The tree handed to the core is malformed (a bug in the exporter or a hand-built tree).
    #[error("invalid module tree: {0}")]
    InvalidTree(String),

    /// A safetensors file or index that is not well formed (the message names the file and the fault).
    #[error("bad checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },

    /// accelerate itself raises on this input; the compatibility layer reports it instead of guessing.
    #[error("accelerate cannot place this model either: {0}")]
    AccelerateFailure(String),
}

pub type Result<T> = std::result::Result<T, PlacementError>;
