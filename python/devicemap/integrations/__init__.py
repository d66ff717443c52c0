"""Make the loaders people already call use devicemap's plans, without changing their code.

    >>> import devicemap.integrations as dm_install
    >>> with dm_install.installed():  # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory=...)

:func:`install` replaces the one function each library calls to turn a strategy string (``"auto"``,
``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) into a device map:

- transformers 5: ``transformers.modeling_utils._get_device_map`` (what ``from_pretrained`` calls);
- accelerate 1: ``load_checkpoint_and_dispatch`` (in ``accelerate`` and ``accelerate.big_modeling``);
- PEFT: the re-plan ``PeftModel.from_pretrained`` / ``load_adapter`` run for a model with CPU/disk entries
  (``peft.peft_model.get_balanced_memory`` / ``infer_auto_device_map``);
- diffusers: ``_determine_device_map`` (model ``from_pretrained`` and ``from_single_file``) and, for
  pipeline ``device_map="balanced"``, ``_assign_components_to_devices`` (whole components onto GPUs).

Each function is replaced as a module attribute, which the library looks up at every call, so code that
imported the library (even before :func:`install`) is reached; the one exception is a name copied out
beforehand (``from accelerate import load_checkpoint_and_dispatch`` run before :func:`install`).
:func:`install` imports no library: one already imported is patched at once, the others as their import
ends. A library that is not installed is skipped; one outside the supported versions is left alone with
one warning. A quantizer that quantizes while loading (bitsandbytes, torchao) is planned with devicemap's
quantized sizes. At call time anything a hook does not recognise (a pre-quantized checkpoint, a quantizer
devicemap cannot size, transformers' ``_no_placement_params``, arguments it does not know) goes to the
library's own function, with one warning per reason; a device map that is not a strategy string goes there
silently, unless it names a GPU this machine lacks (:class:`~devicemap.UnknownDeviceError` instead of torch's
error midway). :func:`uninstall` puts back the exact original function objects.

Unchanged code that loads without devicemap loads with it (``tests/integrations/test_loader_differential.py`` runs every
loader both ways): each hook plans on the budget the library's own planner uses, ``max_memory`` (or the
machine's free memory) plus the unbounded disk accelerate's planner appends (accelerate's loader without an
``offload_folder`` cannot use it: :class:`~devicemap.OffloadFolderError` when the model needs it); a CPU budget
too small to stage the offloaded layers is exceeded by what staging needs, with a warning, as the libraries
exceed it; a GPU in ``max_memory`` that this machine lacks is left out, with a warning, where the library's
own planner places nothing on it, and refused with :class:`~devicemap.UnknownDeviceError` where it would (the
unchanged call fails in torch).

Code that cannot be edited: ``DEVICEMAP=1`` and the start-up line :data:`STARTUP_LINE` (shipped as
``devicemap_hooks.pth``), which installs before the program runs; :func:`install_from_environment` does the same
from ``import devicemap``.
"""

from .patching import (
    ENVIRONMENT_VARIABLE,
    STARTUP_LINE,
    environment_requests_install,
    install,
    install_after_import,
    install_from_environment,
    installed,
    is_installed,
    uninstall,
)

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "STARTUP_LINE",
    "environment_requests_install",
    "install",
    "install_after_import",
    "install_from_environment",
    "installed",
    "is_installed",
    "uninstall",
]
