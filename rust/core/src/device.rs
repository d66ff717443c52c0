//! Devices (GPU i, MPS, CPU, disk), their order, capacities, and parsing of sizes such as "20GiB".

use crate::error::{PlacementError, Result};
use std::fmt;

/// Bits per byte: the core counts sizes in bits so that `bool` tensors (1 bit each, as accelerate
/// counts them) stay exact.
pub const BITS_PER_BYTE: u64 = 8;

/// Bytes to bits, saturating (a capacity of 2^61 bytes is already "infinite" for placement).
pub fn bytes_to_bits(bytes: u64) -> u64 {
    bytes.saturating_mul(BITS_PER_BYTE)
}

/// Bits to whole bytes, rounding up (a partly used byte is used).
pub fn bits_to_bytes(bits: u64) -> u64 {
    bits.div_ceil(BITS_PER_BYTE)
}

/// A placement target, in accelerate's order: GPUs by index, then MPS, then CPU, then disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// An accelerator by index (cuda, xpu, npu, ...: accelerate's integer keys).
    Gpu(u32),
    /// Apple's Metal device (one at most; placed like a GPU).
    Mps,
    /// Main memory: holds offloaded weights, or computes when there is no GPU.
    Cpu,
    /// Offload folder on disk: weights are read from it when their block runs.
    Disk,
}

/// Device types whose index is a GPU index in a plan (accelerate's convention: one accelerator type per
/// machine, its devices numbered 0, 1, ...).
pub const ACCELERATORS: [&str; 9] = ["cuda", "xpu", "npu", "mlu", "musa", "sdaa", "hpu", "mtia", "gpu"];

impl Device {
    /// Parse a device key as accelerate normalises it: an integer or `"<accelerator>:N"` (`"cuda:1"`,
    /// `"xpu:1"`: GPU 1), a bare accelerator type (`"hpu"`: its first device), `"mps"`, `"cpu"` or `"disk"`.
    /// The one parser of device keys: the Python layer hands every string key to it.
    pub fn parse(key: &str) -> Result<Device> {
        let trimmed = key.trim();
        match trimmed {
            "cpu" => return Ok(Device::Cpu),
            "disk" => return Ok(Device::Disk),
            "mps" => return Ok(Device::Mps),
            _ => {}
        }
        let (kind, index) = match trimmed.split_once(':') {
            Some((kind, index)) => (kind, Some(index)),
            None => (trimmed, None),
        };
        let index = match index {
            None if ACCELERATORS.contains(&kind) => Some(0),
            None => digits(kind),
            Some(index) if ACCELERATORS.contains(&kind) => digits(index),
            Some(_) => None,
        };
        index.map(Device::Gpu).ok_or_else(|| PlacementError::UnknownDevice {
            key: key.to_string(),
            pin: None,
        })
    }

    /// A device that computes the blocks it holds (a GPU or MPS): blocks there are not offloaded.
    pub fn is_gpu_like(self) -> bool {
        matches!(self, Device::Gpu(_) | Device::Mps)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Gpu(i) => write!(f, "{i}"),
            Device::Mps => f.write_str("mps"),
            Device::Cpu => f.write_str("cpu"),
            Device::Disk => f.write_str("disk"),
        }
    }
}

/// A GPU index written in ASCII digits only (no sign, no spaces), as Python's `str.isdigit` keys are read.
fn digits(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The devices a plan may use, in placement order, each with a capacity in bits (`None`: unbounded,
/// which only disk may be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    devices: Vec<(Device, Option<u64>)>,
}

impl DeviceSpec {
    /// Build from (device, capacity in bits) pairs in any order. Duplicates are an error; the result is
    /// sorted into placement order.
    pub fn new(mut devices: Vec<(Device, Option<u64>)>) -> Result<DeviceSpec> {
        devices.sort_by_key(|(d, _)| *d);
        for pair in devices.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(PlacementError::DuplicateDevice {
                    key: pair[0].0.to_string(),
                });
            }
        }
        for (device, capacity) in &devices {
            if capacity.is_none() && *device != Device::Disk {
                return Err(PlacementError::UnboundedDevice { device: *device });
            }
        }
        Ok(DeviceSpec { devices })
    }

    /// Every device with its capacity in bits (`None`: unbounded disk), in placement order.
    pub fn devices(&self) -> &[(Device, Option<u64>)] {
        &self.devices
    }

    /// The GPU-like devices with their capacities, in order.
    pub fn gpus(&self) -> impl Iterator<Item = (Device, u64)> + '_ {
        self.devices
            .iter()
            .filter(|(d, _)| d.is_gpu_like())
            .map(|(d, c)| (*d, c.unwrap_or(u64::MAX)))
    }

    /// `None` if the device is not in the spec, else its capacity (`Some(None)`: unbounded).
    pub fn capacity(&self, device: Device) -> Option<Option<u64>> {
        self.devices.iter().find(|(d, _)| *d == device).map(|(_, c)| *c)
    }

    /// Whether the spec lists the device.
    pub fn contains(&self, device: Device) -> bool {
        self.devices.iter().any(|(d, _)| *d == device)
    }
}

/// Parse a memory size the way accelerate reads `max_memory` strings, but strictly: a non-negative
/// number immediately followed by a unit. `KiB/MiB/GiB/TiB` are powers of 1024, `KB/MB/GB/TB` powers of
/// 1000, `B` is bytes. As in accelerate, a decimal unit written with a lowercase final `b` (`"8Gb"`,
/// `"8gb"`) means bits and is divided by 8. Returns bytes.
pub fn parse_size(input: &str) -> Result<u64> {
    let invalid = |reason: &str| PlacementError::InvalidSize {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    if input.is_empty() {
        return Err(invalid("the string is empty"));
    }
    if input.trim() != input || input.contains(char::is_whitespace) {
        return Err(invalid(
            "it contains spaces; write the number and unit together, e.g. \"20GB\"",
        ));
    }
    let split = input
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(input.len());
    let (number, unit) = input.split_at(split);
    if input.starts_with('-') {
        return Err(invalid("sizes cannot be negative"));
    }
    if number.is_empty() {
        return Err(invalid("it does not start with a number"));
    }
    if number.matches('.').count() > 1 || number.starts_with('.') || number.ends_with('.') {
        return Err(invalid("the number is malformed"));
    }
    let upper = unit.to_ascii_uppercase();
    let bits_unit = unit.len() == 2 && unit.ends_with('b');
    let multiplier: f64 = match upper.as_str() {
        "B" => 1.0,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "" => {
            return Err(invalid(
                "it has no unit; pass an int for bytes or add a unit such as \"GiB\"",
            ))
        }
        _ => {
            return Err(invalid(&format!(
                "unknown unit {unit:?}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )))
        }
    };
    let value: f64 = number.parse().map_err(|_| invalid("the number is malformed"))?;
    let scaled = value * multiplier;
    if !scaled.is_finite() || scaled >= u64::MAX as f64 {
        return Err(invalid("it is too large"));
    }
    // Truncate like accelerate's int(float(x) * unit).
    let bytes = scaled as u64;
    Ok(if bits_unit { bytes / 8 } else { bytes })
}

/// Bits as a readable size ("512 B", "1.50 MiB", "70.00 GiB").
pub(crate) fn human(bits: u64) -> String {
    let bytes = bits_to_bytes(bits);
    for (unit, size) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= size {
            return format!("{:.2} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

/// A device as a sentence names it ("GPU 0", "mps", "cpu").
pub(crate) fn label(device: Device) -> String {
    match device {
        Device::Gpu(i) => format!("GPU {i}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_with_accelerate_meaning() {
        assert_eq!(parse_size("20GiB").unwrap(), 20 * (1 << 30));
        assert_eq!(parse_size("512MiB").unwrap(), 512 * (1 << 20));
        assert_eq!(parse_size("20GB").unwrap(), 20_000_000_000);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("8Gb").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("8gb").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("3kib").unwrap(), 3072);
        assert_eq!(parse_size("100B").unwrap(), 100);
    }

    #[test]
    fn rejects_bad_sizes_with_the_input_in_the_message() {
        for bad in ["20 GB", "-1", "20XB", "", "GB", "1.2.3GB", "1000", ".5GB", "nanGB"] {
            let err = parse_size(bad).unwrap_err();
            assert!(matches!(err, PlacementError::InvalidSize { .. }), "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn device_keys_parse_and_sort_in_placement_order() {
        let spec = DeviceSpec::new(vec![
            (Device::parse("disk").unwrap(), None),
            (Device::parse("cpu").unwrap(), Some(1)),
            (Device::parse("1").unwrap(), Some(1)),
            (Device::parse("cuda:0").unwrap(), Some(1)),
        ])
        .unwrap();
        let order: Vec<Device> = spec.devices().iter().map(|(d, _)| *d).collect();
        assert_eq!(order, vec![Device::Gpu(0), Device::Gpu(1), Device::Cpu, Device::Disk]);
        assert!(Device::parse("tpu").is_err());
    }

    #[test]
    fn accelerator_keys_are_gpu_indices_and_nothing_else_is() {
        for (key, index) in [
            ("xpu:2", 2),
            ("npu:0", 0),
            ("hpu", 0),
            (" cuda:3 ", 3),
            ("gpu:1", 1),
            ("7", 7),
        ] {
            assert_eq!(Device::parse(key).unwrap(), Device::Gpu(index), "{key}");
        }
        for bad in [
            "tpu:0", "cuda:-1", "cuda:+1", "cuda:", "cuda:1:2", "-1", "+1", "", "cpu:0", "xpu:a",
        ] {
            assert!(
                matches!(Device::parse(bad), Err(PlacementError::UnknownDevice { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_device_given_twice_is_a_duplicate_device() {
        let err = DeviceSpec::new(vec![
            (Device::parse("cuda:0").unwrap(), Some(1)),
            (Device::Gpu(0), Some(2)),
        ])
        .unwrap_err();
        assert_eq!(err, PlacementError::DuplicateDevice { key: "0".into() });
    }

    #[test]
    fn only_disk_may_be_unbounded() {
        let err = DeviceSpec::new(vec![(Device::Gpu(1), None), (Device::Disk, None)]).unwrap_err();
        assert_eq!(err, PlacementError::UnboundedDevice { device: Device::Gpu(1) });
        assert!(DeviceSpec::new(vec![(Device::Disk, None)]).is_ok());
    }
}
