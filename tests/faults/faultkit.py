"""Test-only machinery of the fault-injection suite (not product code).

* `Zygote`: one Python process that imports torch, timm and the project once, then forks each run of a
  training script on request, so a run costs a fork instead of a 5-second interpreter start. A forked run
  executes the script file as `__main__` (runpy) in its own process, with its own stdout/stderr files,
  and exits the way the interpreter would (SystemExit message on stderr, traceback on any other error).
* Hooks installed in a forked run before the script starts: a trace of every optimiser step (lr, loss and a
  SHA-1 of all parameters), a log of every kill-able moment, and a SIGKILL at one chosen moment: before
  an optimiser update ("step"), during an evaluation forward ("eval"), or halfway through writing a
  checkpoint ("save": half the bytes reach the temp file, then the process dies). Moments are counted by
  the optimiser's global step (AdamW's restored `step`), so they mean the same thing after a resume.

* `run_in_process`: a script's `__main__` in the test process with stdout/stderr captured; the cheap way
  to push a bad input through, for everything where the process itself is not the point.
* `craft_checkpoint`: files whose unpickling would create a marker file (the code a stranger's
  checkpoint could run), in the shapes an attacker would use.

Run as `python faultkit.py ROOT` it serves JSON requests on stdin (the Zygote class speaks to it).
"""
import contextlib
import hashlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import traceback
from pathlib import Path


class Zygote:
    """Client side: start(...) -> pid, wait(pid) -> exit code (negative: killed by that signal)."""

    def __init__(self, root):
        self.process = subprocess.Popen([sys.executable, __file__, str(root)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=root,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self._reply()["ready"]

    def _reply(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fault-injection zygote died")
        return json.loads(line)

    def _ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def start(self, script, argv, folder, hooks=None):
        """Fork a run of `script` (a path) with `argv` in `folder`; its stdout/stderr go to folder/<pid>.out|.err."""
        return self._ask(op="start", script=str(script), argv=[str(a) for a in argv], folder=str(folder),
                         hooks=hooks or {})["pid"]

    def wait(self, pid):
        return self._ask(op="wait", pid=pid)["rc"]

    def run(self, script, argv, folder, **kwargs):
        """Start and wait; returns (exit code, stdout, stderr)."""
        pid = self.start(script, argv, folder, **kwargs)
        rc = self.wait(pid)
        return rc, *output(folder, pid)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def output(folder, pid):
    return tuple((Path(folder) / f"{pid}.{kind}").read_text() for kind in ("out", "err"))


def run_in_process(script, argv, cwd):
    """Run `script` as `__main__` here; returns (exit code, stdout, stderr, message).

    message: what the interpreter would print for the SystemExit ('' on success), or 'TRACEBACK' plus the
    traceback when anything else escaped (which the catalogue counts as a failure).
    """
    out, err = io.StringIO(), io.StringIO()
    previous = sys.argv, os.getcwd()
    sys.argv = [str(script), *map(str, argv)]
    os.chdir(cwd)
    code, message = 0, ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        message = "" if isinstance(exc.code, int) or exc.code is None else str(exc.code)
    except Exception:  # noqa: BLE001  (anything else is exactly what the catalogue looks for)
        code, message = 1, "TRACEBACK " + traceback.format_exc()
    finally:
        sys.argv = previous[0]
        os.chdir(previous[1])
    return code, out.getvalue(), err.getvalue(), message


class _Marker:
    """Unpickling calls `how(*args)`: each creates the marker file, which is how the tests see code ran."""

    def __init__(self, how, args):
        self.how, self.args = how, args

    def __reduce__(self):
        return self.how, self.args


def _payloads(marker):
    import builtins
    import pathlib

    return {"os.system": _Marker(os.system, (f"touch {marker}",)),
            "builtins.exec": _Marker(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
            "pathlib.Path.touch": _Marker(pathlib.Path.touch, (pathlib.Path(marker),))}


CRAFTED_KINDS = ("args", "top", "optimizer", "legacy")


def craft_checkpoint(path, marker, kind="args", payload="os.system"):
    """Write a checkpoint whose unpickling would create `marker`.

    kind: "args" (an official-looking training checkpoint whose `args` is the payload), "top" (the payload
    is the whole file), "optimizer" (hidden in the optimizer state), "legacy" (torch's pre-1.6 format, a
    plain pickle stream).
    """
    import torch

    evil = _payloads(marker)[payload]
    weights = {"w": torch.zeros(2)}
    obj = {"args": {"model": weights, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "args": evil},
           "top": evil,
           "optimizer": {"model": weights, "optimizer": {"state": {0: {"step": evil}}, "param_groups": []},
                         "epoch": 0},
           "legacy": {"model": weights, "args": evil}}[kind]
    torch.save(obj, path, _use_new_zipfile_serialization=kind != "legacy")
    return Path(path)


# ---------------------------------------------------------------------------------------------------
# the forked run


class Hooks:
    """Trace, moment log and the kill, all keyed by the optimiser's global step."""

    def __init__(self, spec):
        import torch
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.torch = torch
        self.trace = open(spec["trace"], "a") if spec.get("trace") else None
        self.moments = open(spec["moments"], "a") if spec.get("moments") else None
        self.kill = spec.get("kill")  # {"kind": ..., "step": global step, "ordinal": n-th such moment at it}
        self.optimizer = None
        self.counts = {}
        real_init = torch.optim.Optimizer.__init__

        def remember(optimizer, *args, **kwargs):
            real_init(optimizer, *args, **kwargs)
            self.optimizer = optimizer

        torch.optim.Optimizer.__init__ = remember
        register_optimizer_step_pre_hook(lambda *_: self.die() if self.moment("step") else None)
        register_optimizer_step_post_hook(lambda optimizer, *_: self.after_step(optimizer))
        register_module_forward_pre_hook(self.before_forward)
        self.real_save = torch.save
        torch.save = self.save
        from advarm import utils

        real_update = utils.MetricLogger.update

        def update(logger, **kwargs):
            if "loss" in kwargs and torch.is_grad_enabled():
                self.write(self.trace, {"step": self.global_step(), "loss": kwargs["loss"]})
            return real_update(logger, **kwargs)

        utils.MetricLogger.update = update

    def write(self, stream, record):
        if stream is not None:
            stream.write(json.dumps(record) + "\n")
            stream.flush()

    def global_step(self):
        optimizer = self.optimizer
        for state in (optimizer.state.values() if optimizer is not None else ()):
            if "step" in state:
                return int(state["step"])
        return 0

    def moment(self, kind):
        """Count a kill-able moment; die if it is the chosen one."""
        key = (kind, self.global_step())
        self.counts[key] = self.counts.get(key, 0) + 1
        self.write(self.moments, {"kind": kind, "step": key[1], "ordinal": self.counts[key]})
        kill = self.kill
        return kill is not None and (kill["kind"], kill["step"], kill["ordinal"]) == (*key, self.counts[key])

    def die(self):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, optimizer):
        digest = hashlib.sha1()
        for group in optimizer.param_groups:
            for param in group["params"]:
                digest.update(param.detach().cpu().numpy().tobytes())
        lr = max(group["lr"] for group in optimizer.param_groups)
        self.write(self.trace, {"step": self.global_step(), "lr": lr, "hash": digest.hexdigest()})

    def before_forward(self, module, _inputs):
        # Evaluation forwards of a whole model (not of its parts): ours all have a patch_embed.
        if not self.torch.is_grad_enabled() and hasattr(module, "patch_embed") and self.moment("eval"):
            self.die()

    def save(self, obj, f, *args, **kwargs):
        if not self.moment("save"):
            return self.real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        self.real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        self.die()


def _exit_code(exc):
    """What the interpreter does with an uncaught SystemExit."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(request):
    code = 1
    try:
        folder, pid = Path(request["folder"]), os.getpid()
        for fd, kind in ((1, "out"), (2, "err")):
            target = os.open(folder / f"{pid}.{kind}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.chdir(folder)
        sys.argv = [request["script"], *request["argv"]]
        import torch

        torch.set_num_threads(1)
        Hooks(request["hooks"])
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(root):
    sys.path.insert(0, str(root))
    sys.path.insert(1, str(Path(root) / "Finetuning"))
    # Everything heavy the scripts import, once; the forks share it.
    import sklearn.datasets  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    import datasets  # noqa: F401
    import engine  # noqa: F401
    import models_adventurer  # noqa: F401
    import models_arm  # noqa: F401
    import samplers  # noqa: F401
    from advarm import checkpoint, cli, loggers, runs, utils  # noqa: F401

    protocol = sys.stdout
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply = {"pid": pid}
        else:
            _, status = os.waitpid(request["pid"], 0)
            reply = {"rc": os.waitstatus_to_exitcode(status)}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
