//! The one place where core errors (and panics) become Python exceptions.

use devicemap_core::device::bits_to_bytes;
use devicemap_core::error::Shortfall;
use devicemap_core::PlacementError as CoreError;

use crate::records::DeviceKey;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

create_exception!(
    devicemap,
    PlacementError,
    PyValueError,
    "Base class of every devicemap error."
);
create_exception!(
    devicemap,
    InvalidSizeError,
    PlacementError,
    "A memory size that cannot be read."
);
create_exception!(
    devicemap,
    UnknownDeviceError,
    PlacementError,
    "A device key that is not a GPU index, 'mps', 'cpu' or 'disk'."
);
create_exception!(
    devicemap,
    DuplicateDeviceError,
    UnknownDeviceError,
    "A device given twice in one max_memory (e.g. 0 and 'cuda:0')."
);
create_exception!(
    devicemap,
    InvalidOptionError,
    PlacementError,
    "An option with a value devicemap does not accept: a strategy, balance, dtype, flag or workload field \
     (the message names the option, the value and what is accepted)."
);
create_exception!(
    devicemap,
    UnknownModuleError,
    PlacementError,
    "A module name (e.g. in pins) that the model does not have."
);
create_exception!(
    devicemap,
    TiedPinConflictError,
    PlacementError,
    "Tied parameters pinned to different devices."
);
create_exception!(
    devicemap,
    PinConflictError,
    PlacementError,
    "Pins that contradict each other."
);
create_exception!(
    devicemap,
    DoesNotFitError,
    PlacementError,
    "The model does not fit on the given devices."
);
create_exception!(devicemap, InvalidTreeError, PlacementError, "A malformed module tree.");
create_exception!(
    devicemap,
    CheckpointError,
    PlacementError,
    "A safetensors checkpoint or index that is not well formed."
);
create_exception!(
    devicemap,
    AccelerateCompatError,
    PlacementError,
    "accelerate itself fails on this input."
);
// Not a PlacementError (so not a ValueError): `except ValueError` around bad input must not hide a bug.
// Unlike PyO3's PanicException (a BaseException) it is still an Exception, so servers catch and log it.
create_exception!(
    devicemap,
    InternalError,
    PyException,
    "A bug in devicemap (a Rust panic, caught)."
);

/// The longest message an exception carries: errors quote names and header content, and one quoting a
/// 50 MB tensor name must not become a 50 MB string. Longer ones keep their start (what went wrong) and
/// end (the fix).
const MESSAGE_LIMIT: usize = 8000;

fn bounded(msg: String) -> String {
    let total = msg.chars().count();
    if total <= MESSAGE_LIMIT {
        return msg;
    }
    let (head, tail) = (MESSAGE_LIMIT * 2 / 3, MESSAGE_LIMIT / 4);
    let start: String = msg.chars().take(head).collect();
    let end: String = msg.chars().skip(total - tail).collect();
    format!("{start} … ({} characters cut) … {end}", total - head - tail)
}

pub fn to_py(err: CoreError) -> PyErr {
    let msg = bounded(err.to_string());
    match err {
        CoreError::InvalidSize { .. } => InvalidSizeError::new_err(msg),
        CoreError::UnknownDevice { .. } => UnknownDeviceError::new_err(msg),
        CoreError::DuplicateDevice { .. } => DuplicateDeviceError::new_err(msg),
        CoreError::InvalidExecutionDevice { .. } => UnknownDeviceError::new_err(msg),
        CoreError::UnboundedDevice { .. } => InvalidSizeError::new_err(msg),
        CoreError::InvalidOption { .. } => InvalidOptionError::new_err(msg),
        CoreError::UnknownModule { .. } => UnknownModuleError::new_err(msg),
        CoreError::TiedPinConflict { .. } => TiedPinConflictError::new_err(msg),
        CoreError::PinConflict { .. } => PinConflictError::new_err(msg),
        CoreError::DoesNotFit(shortfall) => does_not_fit(msg, &shortfall),
        CoreError::InvalidTree(_) => InvalidTreeError::new_err(msg),
        CoreError::AccelerateFailure(_) => AccelerateCompatError::new_err(msg),
        CoreError::Checkpoint { .. } => CheckpointError::new_err(msg),
    }
}

/// `DoesNotFitError` carrying what is short as attributes (`shortfall`, `device`, `missing_bytes`), so
/// callers can act on it without parsing the sentence.
fn does_not_fit(msg: String, shortfall: &Shortfall) -> PyErr {
    let err = DoesNotFitError::new_err(msg);
    Python::attach(|py| {
        let value = err.value(py);
        let device = shortfall.device().map(DeviceKey::from);
        let missing = shortfall.missing_bits().map(bits_to_bytes);
        // Setting attributes on a fresh exception instance cannot fail short of memory exhaustion.
        let _ = value.setattr("shortfall", shortfall.kind());
        let _ = value.setattr("device", device);
        let _ = value.setattr("missing_bytes", missing);
    });
    err
}

/// Run `work` without the GIL; a panic inside becomes `InternalError` instead of aborting Python.
pub fn guarded<T: Send>(py: Python<'_>, work: impl FnOnce() -> Result<T, CoreError> + Send) -> PyResult<T> {
    let outcome = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
    match outcome {
        Ok(result) => result.map_err(to_py),
        Err(payload) => Err(panic_to_err(payload)),
    }
}

/// `InternalError` for a caught panic's payload.
pub fn panic_to_err(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    InternalError::new_err(format!(
        "devicemap hit an internal error ({what}); please report it with the model and arguments"
    ))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PlacementError", py.get_type::<PlacementError>())?;
    m.add("InvalidSizeError", py.get_type::<InvalidSizeError>())?;
    m.add("UnknownDeviceError", py.get_type::<UnknownDeviceError>())?;
    m.add("DuplicateDeviceError", py.get_type::<DuplicateDeviceError>())?;
    m.add("InvalidOptionError", py.get_type::<InvalidOptionError>())?;
    m.add("UnknownModuleError", py.get_type::<UnknownModuleError>())?;
    m.add("TiedPinConflictError", py.get_type::<TiedPinConflictError>())?;
    m.add("PinConflictError", py.get_type::<PinConflictError>())?;
    m.add("DoesNotFitError", py.get_type::<DoesNotFitError>())?;
    m.add("InvalidTreeError", py.get_type::<InvalidTreeError>())?;
    m.add("AccelerateCompatError", py.get_type::<AccelerateCompatError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devicemap_core::Device;

    #[test]
    fn core_errors_map_to_their_python_classes_and_panics_to_internal_error() {
        Python::initialize();
        Python::attach(|py| {
            let duplicate = to_py(CoreError::DuplicateDevice { key: "0".into() });
            assert!(duplicate.is_instance_of::<DuplicateDeviceError>(py));
            assert!(duplicate.is_instance_of::<UnknownDeviceError>(py));
            let option = to_py(CoreError::InvalidOption {
                what: "strategy".into(),
                value: "greedy".into(),
                expected: vec!["auto".into()],
            });
            assert!(option.is_instance_of::<InvalidOptionError>(py));
            assert!(option.is_instance_of::<PlacementError>(py));
            let unbounded = to_py(CoreError::UnboundedDevice { device: Device::Cpu });
            assert!(unbounded.is_instance_of::<InvalidSizeError>(py));
            let panic = guarded(py, || -> Result<(), CoreError> { panic!("boom") }).unwrap_err();
            assert!(panic.is_instance_of::<InternalError>(py));
            assert!(!panic.is_instance_of::<pyo3::exceptions::PyValueError>(py));
            assert!(panic.to_string().contains("boom"));
        });
    }
}
