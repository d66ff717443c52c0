//! Which accelerate release [`accelerate_compat`](super::accelerate_compat) reproduces, and the one place
//! that says which placement behaviour each release has.
//!
//! accelerate's `infer_auto_device_map` changed three times within 1.x in ways that change a returned map
//! or an exception (read from accelerate's `utils/modeling.py`, release by release):
//!
//! | releases | placement loop | module holding a tied parameter (`get_module_size_with_ties`) |
//! |---|---|---|
//! | 1.0 - 1.1 | [`PlacementLoop::Legacy`] | [`TieHolder::Substring`] (looked up only when the module fits alone) |
//! | 1.2 | [`PlacementLoop::Fallback`] | [`TieHolder::Substring`] |
//! | 1.3 - 1.15 | [`PlacementLoop::Fallback`] | [`TieHolder::Prefix`] |
//! | 1.16 - | [`PlacementLoop::Fallback`] | [`TieHolder::PrefixOrSelf`] |

use crate::error::{PlacementError, Result};
use std::fmt;

/// An accelerate release (`major.minor.patch`; pre-release and local parts are not kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccelerateVersion {
    /// Major number (1 for every supported release).
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Patch number.
    pub patch: u32,
}

/// The shape of `infer_auto_device_map`'s main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementLoop {
    /// accelerate 1.0 - 1.1: a module too big for what is left is split (or the device is given up) before
    /// any tie is looked at (`>` test); a module that fits alone then looks up the modules holding its tied
    /// partners. No `fallback_allocation`, no log line for devices left empty.
    Legacy,
    /// accelerate 1.2 and later: the size with ties decides first; a module that fits alone tries to
    /// split a tied partner's module; a module at least as big as what is left (`>=`) is split; else
    /// `fallback_allocation` may pull a smaller module forward before the device is given up (and an
    /// empty device is logged).
    Fallback,
}

/// How `get_module_size_with_ties` finds, in the list still to place, the module holding a tied
/// parameter (the first list entry that passes the test is taken; none raises `IndexError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TieHolder {
    /// accelerate 1.0 - 1.2: the entry's name occurs anywhere in the parameter's name
    /// (`n in tied_param`: "1" holds "layer1.w").
    Substring,
    /// accelerate 1.3 - 1.15: the parameter lies inside the entry (`tied_param.startswith(n + ".")`);
    /// a parameter that is itself an entry (its module was split) is not found: `IndexError`.
    Prefix,
    /// accelerate 1.16 and later: as [`TieHolder::Prefix`], or the entry is the parameter itself.
    PrefixOrSelf,
}

impl AccelerateVersion {
    /// The oldest release devicemap supports (pyproject's floor); older ones are treated as this one.
    pub const OLDEST: AccelerateVersion = AccelerateVersion::new(1, 0, 0);
    /// The newest release whose behaviour was checked; newer ones are treated as this one.
    pub const NEWEST: AccelerateVersion = AccelerateVersion::new(1, 16, 0);

    /// A version from its three numbers.
    pub const fn new(major: u32, minor: u32, patch: u32) -> AccelerateVersion {
        AccelerateVersion { major, minor, patch }
    }

    /// Read a version string as Python packaging prints it: `"1.16.0"`, `"1.2"`, `"1.17.0.dev0"`,
    /// `"1.3.0rc1"`, `"1.5.2+local"` (the numbers up to the first part that is not a number).
    pub fn parse(text: &str) -> Result<AccelerateVersion> {
        let mut numbers = [0u32; 3];
        let mut count = 0;
        for part in text.trim().split('.').take(3) {
            let digits: &str = &part[..part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len())];
            let Ok(n) = digits.parse::<u32>() else { break };
            numbers[count] = n;
            count += 1;
            if digits.len() != part.len() {
                break;
            }
        }
        if count == 0 {
            return Err(PlacementError::InvalidOption {
                what: "accelerate version".to_string(),
                value: text.to_string(),
                expected: vec!["a release number such as \"1.16.0\"".to_string()],
            });
        }
        Ok(AccelerateVersion::new(numbers[0], numbers[1], numbers[2]))
    }

    /// The main loop this release runs.
    pub fn placement_loop(self) -> PlacementLoop {
        if self < AccelerateVersion::new(1, 2, 0) {
            PlacementLoop::Legacy
        } else {
            PlacementLoop::Fallback
        }
    }

    /// How this release finds the module holding a tied parameter.
    pub fn tie_holder(self) -> TieHolder {
        if self < AccelerateVersion::new(1, 3, 0) {
            TieHolder::Substring
        } else if self < AccelerateVersion::new(1, 16, 0) {
            TieHolder::Prefix
        } else {
            TieHolder::PrefixOrSelf
        }
    }

    /// Whether `infer_auto_device_map` takes `fallback_allocation` (1.2 and later).
    pub fn has_fallback_allocation(self) -> bool {
        self.placement_loop() == PlacementLoop::Fallback
    }

    /// Whether `infer_auto_device_map` logs the devices it left empty for lack of memory (1.2 and later).
    pub fn logs_unassigned_devices(self) -> bool {
        self.placement_loop() == PlacementLoop::Fallback
    }
}

impl Default for AccelerateVersion {
    /// The newest behaviour.
    fn default() -> AccelerateVersion {
        AccelerateVersion::NEWEST
    }
}

impl fmt::Display for AccelerateVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_packaging_prints() {
        let v = |s| AccelerateVersion::parse(s).unwrap();
        assert_eq!(v("1.16.0"), AccelerateVersion::new(1, 16, 0));
        assert_eq!(v("1.2"), AccelerateVersion::new(1, 2, 0));
        assert_eq!(v("1.17.0.dev0"), AccelerateVersion::new(1, 17, 0));
        assert_eq!(v("1.3.0rc1"), AccelerateVersion::new(1, 3, 0));
        assert_eq!(v("1.5.2+local"), AccelerateVersion::new(1, 5, 2));
        assert_eq!(v("1.10rc1"), AccelerateVersion::new(1, 10, 0));
        assert!(AccelerateVersion::parse("main").is_err());
        assert!(AccelerateVersion::parse("").is_err());
        assert_eq!(v("1.16.0").to_string(), "1.16.0");
    }

    #[test]
    fn each_release_has_its_behaviour() {
        let v = AccelerateVersion::new;
        let cases = [
            (v(1, 0, 0), PlacementLoop::Legacy, TieHolder::Substring),
            (v(1, 1, 1), PlacementLoop::Legacy, TieHolder::Substring),
            (v(1, 2, 0), PlacementLoop::Fallback, TieHolder::Substring),
            (v(1, 2, 1), PlacementLoop::Fallback, TieHolder::Substring),
            (v(1, 3, 0), PlacementLoop::Fallback, TieHolder::Prefix),
            (v(1, 15, 0), PlacementLoop::Fallback, TieHolder::Prefix),
            (v(1, 16, 0), PlacementLoop::Fallback, TieHolder::PrefixOrSelf),
            (v(1, 20, 3), PlacementLoop::Fallback, TieHolder::PrefixOrSelf),
        ];
        for (version, placement, holder) in cases {
            assert_eq!(version.placement_loop(), placement, "{version}");
            assert_eq!(version.tie_holder(), holder, "{version}");
        }
        assert!(!v(1, 1, 1).has_fallback_allocation() && v(1, 2, 0).has_fallback_allocation());
        assert_eq!(AccelerateVersion::default(), AccelerateVersion::NEWEST);
    }
}
