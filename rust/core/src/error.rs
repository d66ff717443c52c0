//! The one error type of the core. Every variant carries the offending input and a hint at the fix,
//! because the bindings turn these messages straight into Python exceptions.

use crate::device::Device;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// A memory size string or number that cannot be read.
    #[error("invalid memory size {input:?}: {reason}. Use an integer number of bytes or a number with a unit, e.g. \"20GiB\", \"512MiB\", \"1.5GB\"")]
    InvalidSize { input: String, reason: String },

    /// A device key that is not a GPU index, "mps", "cpu" or "disk".
    #[error("unknown device {key:?}: {hint}")]
    UnknownDevice { key: String, hint: String },

    /// A device given twice in one device spec (e.g. `0` and `"cuda:0"` in one `max_memory`).
    #[error("device {key} is given twice in max_memory; give each device once")]
    DuplicateDevice { key: String },

    /// A device other than disk given without a capacity: only disk may be unbounded.
    #[error("device {device} has no memory limit; only \"disk\" may be unbounded. Give it a size such as \"20GiB\"")]
    UnboundedDevice { device: Device },

    /// An option whose value is not one of the accepted ones (a strategy or balance name).
    #[error("invalid {what} {value:?}; use {}", one_of(expected))]
    InvalidOption {
        /// The option, as the user knows it ("strategy", "balance").
        what: String,
        /// The value given.
        value: String,
        /// Every accepted value.
        expected: Vec<String>,
    },

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

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`: the accepted values as a sentence.
fn one_of(expected: &[String]) -> String {
    let quoted: Vec<String> = expected.iter().map(|v| format!("{v:?}")).collect();
    match quoted.split_last() {
        None => "one of the documented values".into(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

pub type Result<T> = std::result::Result<T, PlacementError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn option(expected: &[&str]) -> PlacementError {
        PlacementError::InvalidOption {
            what: "strategy".into(),
            value: "greedy".into(),
            expected: expected.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn invalid_option_names_the_option_the_value_and_every_accepted_value() {
        assert_eq!(
            option(&["auto", "balanced", "sequential"]).to_string(),
            r#"invalid strategy "greedy"; use "auto", "balanced" or "sequential""#
        );
        assert_eq!(
            option(&["memory"]).to_string(),
            r#"invalid strategy "greedy"; use "memory""#
        );
    }

    #[test]
    fn device_errors_name_the_device_and_the_fix() {
        let twice = PlacementError::DuplicateDevice { key: "0".into() }.to_string();
        assert!(
            twice.contains("device 0 is given twice") && twice.contains("give each device once"),
            "{twice}"
        );
        let unbounded = PlacementError::UnboundedDevice { device: Device::Cpu }.to_string();
        assert!(
            unbounded.contains("device cpu has no memory limit") && unbounded.contains("20GiB"),
            "{unbounded}"
        );
    }
}
