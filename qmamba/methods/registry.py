"""The table of quantization methods, which each method module fills with `register`, and the one
lifecycle every method runs.

A method is a `Method` subclass: a name, its options (a dataclass, `NoOptions` when it has
none), its default state quantizer, and the steps of the lifecycle it changes:

    transform    the float model, before any quantizer (SmoothQuant's smoothing)
    install      `qmamba.quant.apply.install_quantizers`, with the method's `observers`
    prepare      modules of its own on the installed quantizers (Quamba's rotations)
    calibrate    `qmamba.quant.calibrate.run_calibration`
    reconstruct  learn quantization parameters (ESR); returns per-block records or None
    round        `qmamba.quant.apply.quantize_weights`

`restore` rebuilds what `prepare` added, without touching weights, when a checkpoint is loaded.

Options dataclass fields become method options (`qmamba.quantize(..., method_options={...})`)
and command-line flags `--<cli_prefix>-<field>` (`qmamba.cli.common`; the class attributes
`cli_prefix`, e.g. "esr", and `cli_title`, e.g. "ESR", name them); a field's metadata refines
its flag:

    flag       the flag's name after the prefix (default: the field name with dashes)
    help       the flag's help; choices, metavar: as argparse's
    option     False: not a method option (filled by the method itself, e.g. ESR's seed)
    per_row    False: not offered by `qmamba compare` (e.g. a resume folder)

An options class may also define `check_run(flag, given, nsamples, seqlen, out)` (checks
against the command line, before the model is loaded) and `work_bytes(d_model, nsamples,
seqlen)` (the memory its work needs, checked before calibration).

It imports none of the method modules: `qmamba.methods` imports them (so that they register
themselves), and the method modules import only this table, never the package.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..errors import QMambaError
from ..quant.apply import install_quantizers, quantize_weights
from ..quant.calibrate import run_calibration


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""
    cli_prefix: ClassVar[str] = ""
    cli_title: ClassVar[str] = ""


@dataclass(frozen=True)
class OptionField:
    """One option of a method, as the CLI offers it."""
    name: str                 # the dataclass field (and method option) name
    flag: str                 # --<prefix>-<name>
    dest: str                 # argparse dest
    type: Any                 # int, float, str, bool, Path
    default: Any
    help: str
    choices: Optional[tuple]
    metavar: Optional[str]
    per_row: bool


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def option_fields(options: type) -> list[OptionField]:
    """The method options of an options dataclass, in field order."""
    hints = typing.get_type_hints(options)
    out = []
    for f in dataclasses.fields(options):
        md = f.metadata
        if md.get("option", True) is False:
            continue
        flag = f"--{options.cli_prefix}-{md.get('flag', f.name.replace('_', '-'))}"
        out.append(OptionField(
            name=f.name, flag=flag, dest=flag[2:].replace("-", "_"), type=_base_type(hints[f.name]),
            default=f.default, help=md.get("help", f.name.replace("_", " ")), choices=md.get("choices"),
            metavar=md.get("metavar"), per_row=md.get("per_row", True)))
    return out


class Method:
    """A quantization method: its options and its steps of the one lifecycle (module docstring).
    Subclasses set the class attributes and override the steps they change."""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[type] = NoOptions
    state_quant: ClassVar[str] = "tensor"       # default state quantizer
    state_scale: ClassVar[str] = "static"       # default state scale mode

    def make_options(self, given: Optional[dict] = None):
        """The options dataclass from a dict of method options (unknown names refused)."""
        given = dict(given or {})
        known = {f.name for f in option_fields(self.options)}
        unknown = set(given) - known
        if unknown:
            raise QMambaError(f"method {self.name} has no option(s) {', '.join(sorted(unknown))}")
        return self.options(**given)

    def observers(self, qcfg, opts) -> Optional[dict]:
        """Quantization point -> observer, where the method's differs from the config's."""
        return None

    def transform(self, model, qcfg, calib, opts, progress: bool) -> None:
        """Float transforms of the model, before any quantizer exists."""

    def prepare(self, model, qcfg, opts) -> None:
        """The method's own modules, on the installed (uncalibrated) quantizers."""

    def reconstruct(self, model, qcfg, calib, opts, progress: bool) -> Optional[list]:
        """Learn quantization parameters on the calibrated model, before rounding; returns one
        record per block (None: the method does not reconstruct)."""
        return None

    def restore(self, model, qcfg, quantization_config: dict) -> None:
        """Checkpoint loading: rebuild what `prepare` added (modules only, weights untouched)."""

    def run(self, model, qcfg, calib, opts=None, progress: bool = True) -> Optional[list]:
        """The lifecycle, in place: transform -> install -> prepare -> calibrate -> reconstruct ->
        round. Returns the reconstruction's records (None without one)."""
        opts = self.options() if opts is None else opts
        self.transform(model, qcfg, calib, opts, progress)
        install_quantizers(model, qcfg, self.observers(qcfg, opts))
        self.prepare(model, qcfg, opts)
        run_calibration(model, calib, progress=progress)
        records = self.reconstruct(model, qcfg, calib, opts, progress)
        quantize_weights(model, qcfg)
        return records

    def __call__(self, model, qcfg, calib, progress: bool = True, **options):
        """`method(model, qcfg, calib, **options)`: the lifecycle with options by keyword."""
        self.run(model, qcfg, calib, self.make_options(options), progress)
        return model


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the table under its `name`."""
    METHODS[cls.name] = cls()
    return cls
