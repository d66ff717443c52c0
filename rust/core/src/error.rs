//! The one error type of the core. Every variant carries the offending input as fields, and its message
//! (written here, from those fields) names the input and the fix, because the bindings turn these
//! messages straight into Python exceptions.

use crate::device::{human, label, Device};
use thiserror::Error;

/// Everything that can go wrong in the core, each variant with the fields its message is made of.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// A memory size string or number that cannot be read.
    #[error("invalid memory size {input:?}: {reason}. Use an integer number of bytes or a number with a unit, e.g. \"20GiB\", \"512MiB\", \"1.5GB\"")]
    InvalidSize {
        /// The size as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A device key that is not a GPU index, "mps", "cpu" or "disk", or a pinned device that is not in
    /// the device spec.
    #[error("unknown device {key:?}: {}", device_hint(pin.as_deref()))]
    UnknownDevice {
        /// The device as given.
        key: String,
        /// The pin naming it, when the key is valid but the device is not in max_memory.
        pin: Option<String>,
    },

    /// A device given twice in one device spec (e.g. `0` and `"cuda:0"` in one `max_memory`).
    #[error("device {key} is given twice in max_memory; give each device once")]
    DuplicateDevice {
        /// The device, as the second mention spelled it.
        key: String,
    },

    /// A device other than disk given without a capacity: only disk may be unbounded.
    #[error("device {device} has no memory limit; only \"disk\" may be unbounded. Give it a size such as \"20GiB\"")]
    UnboundedDevice {
        /// The device without a limit.
        device: Device,
    },

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
    #[error("unknown module {name:?} in {context}{}", module_hint(context, suggestions))]
    UnknownModule {
        /// The name as given.
        name: String,
        /// Where it was given ("pins", "runtime", ...).
        context: String,
        /// Existing names close to it (may be empty).
        suggestions: Vec<String>,
    },

    /// Tied parameters (one storage under several names) that pins send to different devices.
    #[error("tied parameters {names:?} share one storage but are pinned to different devices ({first} and {second} (from pin {pin:?})); pin them to the same device or pin only one of them")]
    TiedPinConflict {
        /// The tied names.
        names: Vec<String>,
        /// The device an earlier pin gave the group.
        first: Device,
        /// The device `pin` gives it.
        second: Device,
        /// The pin that disagrees.
        pin: String,
    },

    /// Two pins inside one unsplittable block that send it to different devices.
    #[error("conflicting pins: {pin:?} -> {device} and {other_pin:?} -> {other_device} fall in the same unsplittable block {block:?}")]
    PinConflict {
        /// The later pin.
        pin: String,
        /// Its device.
        device: Device,
        /// The earlier pin.
        other_pin: String,
        /// Its device.
        other_device: Device,
        /// The block both fall in.
        block: String,
    },

    /// An `execution_device` that is not a GPU of the spec, nor the CPU when the spec has one.
    #[error(
        "execution_device {device} is not a device that can execute offloaded blocks here; use one of {}",
        devices(available)
    )]
    InvalidExecutionDevice {
        /// The device given.
        device: Device,
        /// The devices that could be given: the spec's GPUs and its CPU.
        available: Vec<Device>,
    },

    /// The model does not fit on the given devices.
    #[error("the model does not fit: {0}")]
    DoesNotFit(Shortfall),

    /// The tree handed to the core is malformed (a bug in the exporter or a hand-built tree).
    #[error("invalid module tree: {0}")]
    InvalidTree(String),

    /// A safetensors file or index that is not well formed (the message names the file and the fault).
    #[error("bad checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or folder at fault.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// accelerate itself raises on this input; the compatibility layer reports it instead of guessing.
    #[error("accelerate cannot place this model either: {0}")]
    AccelerateFailure(String),
}

/// Why a model does not fit, with the numbers (bits) the message reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shortfall {
    /// The device spec is empty.
    NoDevice,
    /// The modules pinned to one device exceed its capacity.
    Pinned {
        /// The device.
        device: Device,
        /// What the pinned modules need.
        needed: u64,
        /// What it has.
        capacity: u64,
    },
    /// A GPU is full before any free layer (pinned modules, runtime memory, reserve).
    BeforeFreeLayers {
        /// The GPU.
        device: Device,
        /// What it needs before any free layer.
        needed: u64,
        /// What it has.
        capacity: u64,
    },
    /// The execution device has no room to stage the offloaded blocks.
    Staging {
        /// The execution device.
        device: Device,
        /// The largest block it would stage, when one is known.
        block: Option<String>,
        /// The staging room needed.
        reserve: u64,
        /// What the device holds besides.
        base: u64,
        /// What it has.
        capacity: u64,
        /// Weights and total room when, without disk, not even perfect packing could fit the model.
        total: Option<(u64, u64)>,
        /// Why no other device can execute the block either (other GPUs, the CPU), when they were tried.
        elsewhere: Option<String>,
    },
    /// Blocks are left over and there is no disk to take them.
    NoDisk {
        /// Weights left over.
        left: u64,
        /// All the model's weights.
        total: u64,
        /// How many units are left over.
        units: usize,
        /// The first block left over.
        first: String,
        /// Every device of the spec with its capacity (`None`: unbounded).
        capacities: Vec<(Device, Option<u64>)>,
        /// Staging room kept per device (devices keeping none left out).
        staging: Vec<(Device, u64)>,
    },
}

impl Shortfall {
    /// A stable name for the kind of shortfall (what front ends branch on, not the sentence).
    pub fn kind(&self) -> &'static str {
        match self {
            Shortfall::NoDevice => "no_device",
            Shortfall::Pinned { .. } => "pinned",
            Shortfall::BeforeFreeLayers { .. } => "before_free_layers",
            Shortfall::Staging { .. } => "staging",
            Shortfall::NoDisk { .. } => "no_disk",
        }
    }

    /// The device that is short, where one is.
    pub fn device(&self) -> Option<Device> {
        match self {
            Shortfall::Pinned { device, .. }
            | Shortfall::BeforeFreeLayers { device, .. }
            | Shortfall::Staging { device, .. } => Some(*device),
            Shortfall::NoDevice | Shortfall::NoDisk { .. } => None,
        }
    }

    /// Bits missing: what the short device needs beyond its capacity, or the weights left without a device.
    pub fn missing_bits(&self) -> Option<u64> {
        match self {
            Shortfall::NoDevice => None,
            Shortfall::Pinned { needed, capacity, .. } | Shortfall::BeforeFreeLayers { needed, capacity, .. } => {
                Some(needed.saturating_sub(*capacity))
            }
            Shortfall::Staging {
                reserve,
                base,
                capacity,
                ..
            } => Some(base.saturating_add(*reserve).saturating_sub(*capacity)),
            Shortfall::NoDisk { left, .. } => Some(*left),
        }
    }
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shortfall::NoDevice => write!(
                f,
                "max_memory names no device, so nothing can be placed; give at least one device with its \
                 size, e.g. {{0: \"20GiB\", \"cpu\": \"64GiB\"}}, or omit max_memory to use this machine's free memory"
            ),
            Shortfall::Pinned {
                device,
                needed,
                capacity,
            } => write!(
                f,
                "modules pinned to {device} need {} but it has {}; pin fewer modules there or raise its max_memory",
                human(*needed),
                human(*capacity)
            ),
            Shortfall::BeforeFreeLayers {
                device,
                needed,
                capacity,
            } => write!(
                f,
                "{} needs {} before any free layer (pinned modules, runtime memory, reserve) but has {}; \
                 pin fewer modules there, shrink the workload or raise its max_memory",
                label(*device),
                human(*needed),
                human(*capacity)
            ),
            Shortfall::Staging {
                device,
                block,
                reserve,
                base,
                capacity,
                total,
                elsewhere,
            } => {
                let named = block.as_ref().map(|b| format!(" {b:?}")).unwrap_or_default();
                write!(
                    f,
                    "{} executes the offloaded layers and needs {} free to stage them (the largest offloaded \
                     block{named} with the tied tensors it uses, plus their runtime memory and buffers) on top of {}, \
                     but has {}: give it at least {} or offload less",
                    label(*device),
                    human(*reserve),
                    human(*base),
                    human(*capacity),
                    human(base.saturating_add(*reserve)),
                )?;
                if let Some((weights, room)) = total {
                    write!(
                        f,
                        "; besides, the model's {} of weights exceed all the devices hold together ({}) by {}: \
                         add \"disk\" to max_memory or give the devices more memory",
                        human(*weights),
                        human(*room),
                        human(weights.saturating_sub(*room))
                    )?;
                }
                if let Some(why) = elsewhere {
                    write!(f, "; no other GPU can stage it, and it cannot run on the CPU: {why}")?;
                }
                Ok(())
            }
            Shortfall::NoDisk {
                left,
                total,
                units,
                first,
                capacities,
                staging,
            } => {
                let capacities: Vec<String> = capacities
                    .iter()
                    .map(|(d, cap)| {
                        format!(
                            "{}: {}",
                            label(*d),
                            cap.map(human).unwrap_or_else(|| "unbounded".into())
                        )
                    })
                    .collect();
                let staging: String = staging
                    .iter()
                    .map(|(d, r)| {
                        format!(
                            "; {} of {} is kept free to stage offloaded layers",
                            human(*r),
                            label(*d)
                        )
                    })
                    .collect();
                write!(
                    f,
                    "{} of the model's {} of weights ({units} blocks from {first:?} on) fit on no device \
                     (capacities {}{staging}); add \"disk\" to max_memory to offload them, or give the devices \
                     more memory",
                    human(*left),
                    human(*total),
                    capacities.join(", "),
                )
            }
        }
    }
}

/// The fix for an unknown device key, or for a pin to a device missing from max_memory.
fn device_hint(pin: Option<&str>) -> String {
    match pin {
        Some(pin) => format!("pin {pin:?} names a device that is not in max_memory; add it there or pin elsewhere"),
        None => "use an integer GPU index (0, 1, ...), an accelerator device such as \"cuda:N\", \"xpu:N\" or \"npu:N\", or \"mps\", \"cpu\" or \"disk\"".into(),
    }
}

/// "; did you mean a, b?" when names are close; for pins without a close name, what pin names are.
fn module_hint(context: &str, suggestions: &[String]) -> String {
    if !suggestions.is_empty() {
        format!("; did you mean {}?", suggestions.join(", "))
    } else if context == "pins" {
        "; pin names are module or parameter names as in model.named_modules()".into()
    } else {
        String::new()
    }
}

/// The devices as a list a user can copy ("0, 1 or cpu").
fn devices(available: &[Device]) -> String {
    if available.is_empty() {
        return "none: the spec has no GPU and no CPU".into();
    }
    one_of(&available.iter().map(|d| d.to_string()).collect::<Vec<_>>())
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

/// The core's result type.
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

    #[test]
    fn structured_fields_read_as_one_sentence() {
        let unknown = |suggestions: &[&str], context: &str| {
            PlacementError::UnknownModule {
                name: "lm_haed".into(),
                context: context.into(),
                suggestions: suggestions.iter().map(|s| s.to_string()).collect(),
            }
            .to_string()
        };
        assert_eq!(
            unknown(&["lm_head"], "pins"),
            r#"unknown module "lm_haed" in pins; did you mean lm_head?"#
        );
        assert!(unknown(&[], "pins").ends_with("pin names are module or parameter names as in model.named_modules()"));
        assert_eq!(unknown(&[], "runtime"), r#"unknown module "lm_haed" in runtime"#);
        let conflict = PlacementError::PinConflict {
            pin: "a.x".into(),
            device: Device::Cpu,
            other_pin: "a.y".into(),
            other_device: Device::Gpu(0),
            block: "a".into(),
        };
        assert_eq!(
            conflict.to_string(),
            r#"conflicting pins: "a.x" -> cpu and "a.y" -> 0 fall in the same unsplittable block "a""#
        );
        let pinned = PlacementError::UnknownDevice {
            key: "1".into(),
            pin: Some("head".into()),
        };
        assert!(pinned
            .to_string()
            .contains(r#"pin "head" names a device that is not in max_memory"#));
        let fit = PlacementError::DoesNotFit(Shortfall::Pinned {
            device: Device::Gpu(1),
            needed: 16 << 30,
            capacity: 8 << 30,
        });
        assert_eq!(
            fit.to_string(),
            "the model does not fit: modules pinned to 1 need 2.00 GiB but it has 1.00 GiB; pin fewer modules \
             there or raise its max_memory"
        );
    }
}
