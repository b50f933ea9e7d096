"""Training checkpoints on Orbax: save sharded state from any mesh, restore it straight into the
shardings of another mesh, and turn every way a checkpoint can be wrong into one `CheckpointError`
that says what is wrong.

Layout: one Orbax `CheckpointManager` directory, one sub-directory per step, each a composite of
  params      StandardSave of the parameters
  opt_state   StandardSave of the optimizer state (optional)
  meta        JSON: whatever the trainer needs to resume (step, rng as a list, config dict)
  data_state  JSON: the data iterator's position (optional)
Orbax writes a step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a half step that looks finished; old steps are removed only by `keep_last`.

Trees are stored in a canonical form, nested dicts with string keys: every key-path entry becomes
a string (dict key, list index, attribute name) and a Variable's `.value` hop is dropped. So an
nnx.State (int keys for `layers`, Param boxes), `nnx.to_pure_dict` of it, and optax states all
save the same way, and a checkpoint written from one form restores into the other. On restore
the arrays are put back into the structure of the target tree the caller passes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from zipr1_jax.sharding.rules import norm_path

log = logging.getLogger(__name__)

Path = tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the tree it is restored into."""


# ------------------------------------------------------------------ canonical trees
def _key(path: Path) -> str:
    return "/".join(path) or "<root>"


def _flatten(tree: Any, what: str) -> tuple[list[tuple[Path, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = [(norm_path(p), x) for p, x in leaves]
    seen: set[Path] = set()
    for p, _ in flat:
        if p in seen:
            raise CheckpointError(f"{what}: two leaves map to the same checkpoint key {_key(p)!r}")
        seen.add(p)
    return flat, treedef


def to_canonical(tree: Any, what: str = "tree") -> dict:
    """Nested dict of str keys holding the leaves of `tree` (see module docstring)."""
    out: dict = {}
    for path, leaf in _flatten(tree, what)[0]:
        if not path:
            raise CheckpointError(f"{what}: a bare array cannot be checkpointed, wrap it in a dict")
        node = out
        for i, k in enumerate(path[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{what}: key {_key(path[:i + 1])!r} is both a leaf and a subtree")
        if path[-1] in node:
            raise CheckpointError(f"{what}: key {_key(path)!r} is both a leaf and a subtree")
        node[path[-1]] = leaf
    return out


def _walk(nested: Any, prefix: Path = ()) -> dict[Path, Any]:
    if isinstance(nested, Mapping):
        out: dict[Path, Any] = {}
        for k, v in nested.items():
            out.update(_walk(v, prefix + (str(k),)))
        return out
    return {prefix: nested}


def _lookup(nested: Any, path: Path) -> Any:
    for k in path:
        nested = nested[k]
    return nested


def _abstract_leaf(x: Any, path: Path, what: str) -> jax.ShapeDtypeStruct:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise CheckpointError(f"{what} target key {_key(path)!r} is a {type(x).__name__}, expected "
                              "jax.ShapeDtypeStruct(shape, dtype, sharding=...) or an array")
    sharding = getattr(x, "sharding", None)
    if sharding is None:  # numpy / unsharded abstract leaf: land it on the first local device
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


def _prepare_target(target: Any, what: str) -> tuple[list[Path], Any, dict]:
    """(leaf paths in flatten order, treedef, canonical nested dict of ShapeDtypeStructs)."""
    flat, treedef = _flatten(target, what)
    abstract = [(p, _abstract_leaf(x, p, what)) for p, x in flat]
    nested = to_canonical(jax.tree_util.tree_unflatten(treedef, [a for _, a in abstract]), what)
    return [p for p, _ in flat], treedef, nested


def _check_against_metadata(target: dict, stored: Any, what: str, where: str) -> None:
    """Raise naming the keys a target lacks / has in excess / has with another shape."""
    tree = getattr(stored, "tree", stored)
    if not isinstance(tree, Mapping) or not tree:
        raise CheckpointError(f"{where} holds no readable {what} tree metadata: not an Orbax checkpoint, "
                              "or damaged")
    stored_leaves = _walk(tree)
    target_leaves = _walk(target)
    missing = sorted(set(target_leaves) - set(stored_leaves))
    extra = sorted(set(stored_leaves) - set(target_leaves))
    shapes = [(p, tuple(getattr(stored_leaves[p], "shape", ()) or ()), tuple(target_leaves[p].shape))
              for p in sorted(set(target_leaves) & set(stored_leaves))]
    shapes = [(p, a, b) for p, a, b in shapes if a != b]
    problems = []
    if missing:
        problems.append(f"target keys not in the checkpoint: {_few(missing)}")
    if extra:
        problems.append(f"checkpoint keys the target lacks: {_few(extra)}")
    if shapes:
        problems.append("shape mismatches: " + ", ".join(f"{_key(p)!r} checkpoint {a} vs target {b}"
                                                         for p, a, b in shapes[:5]))
    if problems:
        raise CheckpointError(f"{what} of {where} does not match the target tree: " + "; ".join(problems))


def _few(paths: list[Path], n: int = 5) -> str:
    names = ", ".join(repr(_key(p)) for p in paths[:n])
    return names + (f" (+{len(paths) - n} more)" if len(paths) > n else "")


def _rebuild(paths: list[Path], treedef: Any, restored: dict) -> Any:
    return jax.tree_util.tree_unflatten(treedef, [_lookup(restored, p) for p in paths])


def _json_checked(value: Any, name: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name} must be JSON-serializable (lists, not arrays; plain dicts): {e}") from e
    return value


def _as_path(directory: str | os.PathLike) -> epath.Path:
    s = os.fspath(directory)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def _cause_text(e: BaseException) -> str:
    """`Type: first line` of the most telling exception in e's chain: orbax wraps the real cause
    (a tensorstore / JSON error) in exceptions whose text can be a bare object repr."""
    seen, chain = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        text = str(x).strip()
        first = text.splitlines()[0] if text else ""
        if first and not first.startswith("<"):
            if len(first) > 400:  # keep the end too: tensorstore puts the OS error ("File too large") last
                first = first[:200] + " ... " + first[-180:]
            return f"{type(x).__name__}: {first}"
    return type(chain[-1]).__name__ if chain else "unknown error"


def _unreadable(where: str, e: Exception, hint: str = "") -> CheckpointError:
    return CheckpointError(f"{where} could not be read, it may be corrupt or incomplete ({_cause_text(e)}){hint}")


class _OneLine(logging.Filter):
    """Orbax's background threads log a failed save (disk full, ...) as dozens of tracebacks, one
    per array. The Checkpointer raises one CheckpointError with the cause instead, so orbax's error
    records keep their first line and asyncio's about tasks that wrote into a checkpoint directory
    are dropped."""

    def __init__(self):
        super().__init__()
        self.directories: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            text = record.getMessage()
            ours = any(d in text for d in self.directories)
            if ours and record.name == "asyncio":  # "exception was never retrieved" of a failed write
                return False
            if "orbax" in record.pathname or ours:
                record.msg, record.args = text.splitlines()[0][:300], None
                record.exc_info = record.exc_text = record.stack_info = None
        return True


_ONE_LINE = _OneLine()


def _quiet_failures(directory: str) -> None:
    _ONE_LINE.directories.add(directory)
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _ONE_LINE not in logger.filters:
            logger.addFilter(_ONE_LINE)


# ------------------------------------------------------------------ manager
class Checkpointer:
    """Periodic training checkpoints in `directory` (local path or any epath URL such as gs://).

    Args:
      keep_last: number of most recent steps kept; older ones are deleted after a newer one lands.
      save_every: `save` writes only when step % save_every == 0 (0: only when forced).
      async_save: write in a background thread; arrays are copied to host before `save` returns,
        so the caller may update / donate them right away. Call `wait()` (or `close()`) at exit.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, save_every: int = 0,
                 async_save: bool = True):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"Checkpointer.keep_last must be an int >= 1, got {keep_last!r}")
        if not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"Checkpointer.save_every must be an int >= 0, got {save_every!r}")
        self.directory = _as_path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory")
        self.keep_last, self.save_every, self.async_save = keep_last, save_every, async_save
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, save_interval_steps=1,
                                               enable_async_checkpointing=async_save, create=True)
        # Handlers named up front: a fresh manager (resume in a new process) can then read the
        # item metadata needed to validate a target before restoring anything.
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(), "data_state": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # an async save not yet confirmed on disk
        _quiet_failures(str(self.directory))

    # -------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int, *, force: bool = False) -> bool:
        return force or (self.save_every > 0 and step % self.save_every == 0)

    # -------------------------------------------------------------- save
    def save(self, step: int, *, params: Any, opt_state: Any = None, meta: dict | None = None,
             data_state: dict | None = None, force: bool = False) -> bool:
        """Write step `step` if `save_every` says so (or `force`); returns whether a save started.

        A step that already exists is never overwritten (returns False with a warning).
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"save: step must be an int >= 0, got {step!r}")
        if not self.should_save(step, force=force):
            return False
        if step in self._manager.all_steps():  # never overwritten, and never skipped silently
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}; refusing to "
                                  "overwrite it (a second run in the same directory?)")
        self.check()  # a failed earlier async save is reported before another one starts
        items: dict[str, Any] = {
            "params": ocp.args.StandardSave(to_canonical(params, "params")),
            "meta": ocp.args.JsonSave(_json_checked(dict(meta or {}), "meta")),
        }
        if opt_state is not None and jax.tree.leaves(opt_state):
            items["opt_state"] = ocp.args.StandardSave(to_canonical(opt_state, "opt_state"))
        if data_state is not None:
            items["data_state"] = ocp.args.JsonSave(_json_checked(dict(data_state), "data_state"))
        try:
            started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as e:  # the wait for an earlier background save can raise its failure here
            raise CheckpointError(f"saving a checkpoint to {self.directory} failed ({_cause_text(e)})") from e
        if started and self.async_save:
            self._pending = step
        return started

    # -------------------------------------------------------------- restore
    def restore(self, step: int | None = None, *, params_target: Any, opt_state_target: Any = None) -> dict:
        """Read step `step` (default: the latest) into the shardings of the target trees.

        Args:
          params_target / opt_state_target: trees of jax.ShapeDtypeStruct(shape, dtype,
            sharding=...) (or arrays, whose sharding is reused), in any structure that maps to the
            saved keys (nnx.State or pure dict). Build them with
            `abstract_with_shardings(jax.eval_shape(...), state_shardings(...))`.
        Returns:
          dict(step=int, params=<params_target's structure with arrays>, opt_state=<same> or None,
          meta=dict, data_state=dict or None).
        """
        self.wait()  # a pending async save of this step must land first
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory} holds no checkpoint (no finished step directories)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        where = f"checkpoint step {step} in {self.directory}"
        others = [s for s in steps if s != step]
        hint = f"; other steps: {others}" if others else ""
        step_dir = self.directory / str(step)
        present = {p.name for p in step_dir.iterdir()} if step_dir.exists() else set()
        if "params" not in present:
            raise CheckpointError(f"{where} has no params item (found {sorted(present)}){hint}")
        if opt_state_target is not None and jax.tree.leaves(opt_state_target) and "opt_state" not in present:
            raise CheckpointError(f"{where} has no opt_state (saved params-only); pass opt_state_target=None")

        p_paths, p_def, p_nested = _prepare_target(params_target, "params")
        want_opt = opt_state_target is not None and bool(jax.tree.leaves(opt_state_target))
        if want_opt:
            o_paths, o_def, o_nested = _prepare_target(opt_state_target, "opt_state")
        try:
            stored = self._manager.item_metadata(step)
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            raise _unreadable(where, e, hint) from e
        for name, target in (("params", p_nested),) + ((("opt_state", o_nested),) if want_opt else ()):
            md = stored[name] if name in stored else None
            if md is None:
                raise CheckpointError(f"{where}: the metadata of {name} is missing or unreadable{hint}")
            _check_against_metadata(target, md, name, where)

        args = {"params": ocp.args.StandardRestore(p_nested)}
        if want_opt:
            args["opt_state"] = ocp.args.StandardRestore(o_nested)
        for name in ("meta", "data_state"):
            if name in present:
                args[name] = ocp.args.JsonRestore()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise _unreadable(where, e, hint) from e
        opt_state = None
        if want_opt:
            opt_state = _rebuild(o_paths, o_def, out["opt_state"])
        elif opt_state_target is not None:  # a target without leaves (e.g. optax.sgd's EmptyState)
            opt_state = opt_state_target
        return {
            "step": step,
            "params": _rebuild(p_paths, p_def, out["params"]),
            "opt_state": opt_state,
            "meta": dict(out["meta"]) if "meta" in args else {},
            "data_state": dict(out["data_state"]) if "data_state" in args else None,
        }

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the JSON meta of a step (e.g. to learn its phase before building the targets)."""
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory} holds no checkpoint (no finished step directories)")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        if not (self.directory / str(step) / "meta").exists():
            return {}
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise _unreadable(f"checkpoint step {step} in {self.directory}", e) from e
        return dict(out["meta"])

    def set_aside_after(self, step: int, *, also: tuple[str, ...] = ()) -> list[int]:
        """Move every step after `step`, and the sub-directories named in `also` (e.g. "reference"),
        to `<directory>/superseded/<name>[.k]` (kept, not deleted), e.g. to resume from an older
        step; returns the steps moved."""
        self.wait()
        later = [s for s in self.all_steps() if s > step]
        names = [str(s) for s in later] + [n for n in also if (self.directory / n).exists()]
        if names:
            aside = self.directory / "superseded"
            aside.mkdir(parents=True, exist_ok=True)
            for name in names:
                dest, k = aside / name, 1
                while dest.exists():
                    dest, k = aside / f"{name}.{k}", k + 1
                (self.directory / name).rename(dest)
                log.warning("checkpoint %s moved to %s", name, dest)
            self._manager.reload()
        return later

    # -------------------------------------------------------------- lifecycle
    def check(self) -> None:
        """Raise a CheckpointError now if a background save has failed (disk full, no permission),
        instead of at the next save or at exit. Cheap: it looks only once the save has ended."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            self._pending = None
            raise CheckpointError(f"saving a checkpoint to {self.directory} failed ({_cause_text(e)})") from e
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()  # the save has ended: returns at once, or raises its failure

    def wait(self) -> None:
        """Block until a pending async save is on disk (and old steps are pruned); a CheckpointError
        if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"saving a checkpoint to {self.directory} failed ({_cause_text(e)})") from e
        if step is not None:
            self._manager.reload()
            if step not in self._manager.all_steps():  # orbax logged the failure but raised nothing
                raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: the step never "
                                      "finished (see the log above for the cause)")

    def close(self) -> None:
        try:
            self._manager.close()  # waits for a pending save: its failure can surface here
        except Exception as e:
            raise CheckpointError(f"saving a checkpoint to {self.directory} failed ({_cause_text(e)})") from e

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ params-only checkpoints
def check_writable(directory: str | os.PathLike, what: str = "checkpoint directory") -> None:
    """Create `directory` if needed and write + remove a probe file in it; a CheckpointError names
    the path if that fails, so an unwritable directory stops a run before its first step instead
    of at its first (background) save. URLs (gs://...) are left to the first save."""
    s = os.fspath(directory)
    if "://" in s:
        return
    probe = os.path.join(s, f".zipr1_write_probe_{os.getpid()}")
    try:
        os.makedirs(s, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"{what} {os.path.abspath(s)} is not writable ({type(e).__name__}: {e.strerror or e})") \
            from e


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a params-only checkpoint (e.g. after HF conversion) to a new directory `path`."""
    target = _as_path(path)
    if target.exists():
        raise CheckpointError(f"save_params: {target} already exists; refusing to overwrite it")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(target, to_canonical(params, "params"))
            ckptr.wait_until_finished()
    except Exception as e:  # disk full, permissions: one clear error naming the path
        raise CheckpointError(f"saving parameters to {target} failed ({_cause_text(e)})") from e


def restore_params(path: str | os.PathLike, target: Any) -> Any:
    """Read a params-only checkpoint (from `save_params`, or `<checkpointer dir>/<step>/params`)
    into the structure and shardings of `target` (see `Checkpointer.restore`)."""
    src = _as_path(path)
    where = f"params checkpoint {src}"
    if not src.is_dir():
        raise CheckpointError(f"{where} does not exist or is not a directory")
    paths, treedef, nested = _prepare_target(target, "params")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(src)
        except Exception as e:
            raise CheckpointError(f"{where} is not an Orbax checkpoint or is damaged ({_cause_text(e)})") from e
        if stored is None:
            raise CheckpointError(f"{where} is not an Orbax checkpoint (no readable tree metadata)")
        _check_against_metadata(nested, getattr(stored, "item_metadata", stored), "params", where)
        try:
            restored = ckptr.restore(src, nested)
        except Exception as e:
            raise _unreadable(where, e) from e
    return _rebuild(paths, treedef, restored)


def params_dir(path: str | os.PathLike) -> str:
    """The params-only checkpoint inside `path`: `path` itself (from `save_params`, or a run's
    `checkpoints/reference`), `path/params` for a step directory, or the latest step's params of
    a Checkpointer directory. CheckpointError names what was found otherwise."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise CheckpointError(f"params checkpoint {p!r} does not exist or is not a directory")
    names = set(os.listdir(p))
    if names & {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"} and "params" not in names:
        return p
    if os.path.isdir(os.path.join(p, "params")):
        return os.path.join(p, "params")
    steps = sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(p, n, "params")))
    if steps:
        return os.path.join(p, str(steps[-1]), "params")
    raise CheckpointError(f"{p!r} holds no parameters: expected a params-only Orbax checkpoint, a step directory "
                          f"with params/, or a checkpoint directory with step sub-directories (found "
                          f"{sorted(names)[:8]})")
