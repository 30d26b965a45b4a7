"""Apptainer sandbox metadata, as ``apptainer build --sandbox`` writes it for a Docker image.

``/.singularity.d`` (actions, env, runscript, labels), the legacy root symlinks and the mount
points Apptainer expects. Every write replaces a path (never truncates a file in place, so
files hardlinked to ``.layers`` stay untouched) and never follows a symlink of the image.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from collections.abc import Sequence

from ..registry.documents import ImageConfig
from ..repo.fs import Dir, UnsafePath

ENV_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DIRS = (".singularity.d/libs", ".singularity.d/actions", ".singularity.d/env", "dev", "proc",
        "root", "var/tmp", "tmp", "etc", "sys", "home",
        "cvmfs", "srv")    # bind-mount points OSG adds: a read-only CVMFS image needs them
LINKS = {"singularity": ".singularity.d/runscript", "apptainer": ".singularity.d/runscript",
         ".run": ".singularity.d/actions/run", ".exec": ".singularity.d/actions/exec",
         ".test": ".singularity.d/actions/test", ".shell": ".singularity.d/actions/shell",
         "environment": ".singularity.d/env/90-environment.sh"}

_SOURCE_ENV = """for script in /.singularity.d/env/*.sh; do
    if [ -f "$script" ]; then
        . "$script"
    fi
done
"""

ACTIONS = {
    "exec": f"#!/bin/sh\n\n{_SOURCE_ENV}\nexec \"$@\"\n",
    "run": f"""#!/bin/sh

{_SOURCE_ENV}
if test -n "${{APPTAINER_APPNAME:-}}"; then
    if test -x "/scif/apps/${{APPTAINER_APPNAME:-}}/scif/runscript"; then
        exec "/scif/apps/${{APPTAINER_APPNAME:-}}/scif/runscript" "$@"
    elif test -x "/scif/apps/singularity/scif/runscript"; then
        exec "/scif/apps/singularity/scif/runscript" "$@"
    else
        echo "No Apptainer runscript for contained app: ${{APPTAINER_APPNAME:-}}"
        exit 1
    fi
elif test -x "/.singularity.d/runscript"; then
    exec "/.singularity.d/runscript" "$@"
else
    echo "No Apptainer runscript found, executing /bin/sh"
    exec /bin/sh "$@"
fi
""",
    "shell": f"""#!/bin/sh

{_SOURCE_ENV}
if test -n "$APPTAINER_SHELL" -a -x "$APPTAINER_SHELL"; then
    exec $APPTAINER_SHELL "$@"
    echo "ERROR: Failed running shell as defined by '\\$APPTAINER_SHELL'" 1>&2
    exit 1
elif test -x /bin/bash; then
    SHELL=/bin/bash
    PS1="Apptainer $APPTAINER_NAME:\\\\w> "
    export SHELL PS1
    exec /bin/bash --norc "$@"
elif test -x /bin/sh; then
    SHELL=/bin/sh
    export SHELL
    exec /bin/sh "$@"
else
    echo "ERROR: /bin/sh does not exist in container" 1>&2
fi
exit 1
""",
    "start": f"""#!/bin/sh

# tell PID 1 to continue (instance start)
kill -CONT 1

{_SOURCE_ENV}
if test -x "/.singularity.d/startscript"; then
    exec "/.singularity.d/startscript"
fi
""",
    "test": f"""#!/bin/sh

{_SOURCE_ENV}
if test -n "${{APPTAINER_APPNAME:-}}"; then
    if test -x "/scif/apps/${{APPTAINER_APPNAME:-}}/scif/test"; then
        exec "/scif/apps/${{APPTAINER_APPNAME:-}}/scif/test" "$@"
    elif test -x "/scif/apps/singularity/scif/test"; then
        exec "/scif/apps/singularity/scif/test" "$@"
    else
        echo "No tests for contained app: ${{APPTAINER_APPNAME:-}}"
        exit 1
    fi
elif test -x "/.singularity.d/test"; then
    exec "/.singularity.d/test" "$@"
else
    echo "No test found in container, executing /bin/sh -c true"
    exec /bin/sh -c true
fi
""",
}

ENV_FILES = {
    "01-base.sh": "#!/bin/sh\n#\n# Base environment of the container (written by unpacked).\n#\n",
    "90-environment.sh": "#!/bin/sh\n# Custom environment shell code should follow\n\n",
    "95-apps.sh": """#!/bin/sh
# SCIF apps: put the active app on PATH and LD_LIBRARY_PATH and source its environment.

if test -n "${APPTAINER_APPNAME:-}"; then
    export APPTAINER_APPNAME
    if test -d "/scif/apps/${APPTAINER_APPNAME:-}/"; then
        SCIF_APPS="/scif/apps"
        SCIF_APPROOT="/scif/apps/${APPTAINER_APPNAME:-}"
        export SCIF_APPROOT SCIF_APPS
        PATH="/scif/apps/${APPTAINER_APPNAME:-}:/scif/apps/singularity:$PATH"
        if test -d "/scif/apps/${APPTAINER_APPNAME:-}/bin"; then
            PATH="/scif/apps/${APPTAINER_APPNAME:-}/bin:$PATH"
        elif test -d "/scif/apps/singularity/bin"; then
            PATH="/scif/apps/singularity/bin:$PATH"
        fi
        if test -d "/scif/apps/${APPTAINER_APPNAME:-}/lib"; then
            LD_LIBRARY_PATH="/scif/apps/${APPTAINER_APPNAME:-}/lib:$LD_LIBRARY_PATH"
            export LD_LIBRARY_PATH
        elif test -d "/scif/apps/singularity/lib"; then
            LD_LIBRARY_PATH="/scif/apps/singularity/lib:$LD_LIBRARY_PATH"
            export LD_LIBRARY_PATH
        fi
        if [ -f "/scif/apps/${APPTAINER_APPNAME:-}/scif/env/01-base.sh" ]; then
            . "/scif/apps/${APPTAINER_APPNAME:-}/scif/env/01-base.sh"
        elif [ -f "/scif/apps/singularity/scif/env/01-base.sh" ]; then
            . "/scif/apps/singularity/scif/env/01-base.sh" "$@"
        fi
        if [ -f "/scif/apps/${APPTAINER_APPNAME:-}/scif/env/90-environment.sh" ]; then
            . "/scif/apps/${APPTAINER_APPNAME:-}/scif/env/90-environment.sh"
        elif [ -f "/scif/apps/singularity/scif/env/90-environment.sh" ]; then
            . "/scif/apps/singularity/scif/env/90-environment.sh" "$@"
        fi
        export PATH
    else
        echo "Could not locate the container application: ${APPTAINER_APPNAME}"
        exit 1
    fi
fi
""",
    "99-base.sh": """#!/bin/sh
# Container libraries last on LD_LIBRARY_PATH, and the prompt.

if [ -z "$LD_LIBRARY_PATH" ]; then
    LD_LIBRARY_PATH="/.singularity.d/libs"
else
    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"
fi

PS1="Apptainer> "
export LD_LIBRARY_PATH PS1
""",
    "99-runtimevars.sh": """#!/bin/sh
# PATH changes asked for at run time (--env PREPEND_PATH, APPEND_PATH, PATH).

if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PREPEND_PATH}:${PATH}"
fi

if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
    PATH="${PATH}:${SING_USER_DEFINED_APPEND_PATH}"
fi

if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PATH}"
fi

unset SING_USER_DEFINED_PREPEND_PATH \\
      SING_USER_DEFINED_APPEND_PATH \\
      SING_USER_DEFINED_PATH

export PATH
""",
}


def escape(value: str) -> str:
    """Escape for a double-quoted shell word: backslash, double quote, backtick, dollar."""
    for char in ("\\", '"', "`", "$"):
        value = value.replace(char, "\\" + char)
    return value


def env_script(env: Sequence[str] | None) -> str:
    """``10-docker2singularity.sh``: PATH set outright, the rest as defaults the host can win."""
    lines = ["#!/bin/sh"]
    for item in env or []:
        name, sep, value = item.partition("=")
        if not ENV_NAME.match(name):
            continue
        if not sep:
            lines.append(f'export {name}="${{{name}:-}}"')
        elif name == "PATH":
            lines.append(f'export PATH="{escape(value)}"')
        else:
            lines.append(f'export {name}="${{{name}:-"{escape(value)}"}}"')
    return "\n".join(lines) + "\n"


def _quoted_args(args: Sequence[str] | None) -> str:
    """Apptainer's form: each argument double-quoted, the whole in single quotes."""
    words = " ".join(f'"{escape(a)}"' for a in args or [])
    return "'" + words.replace("'", "'\"'\"'") + "'"


def runscript(entrypoint: Sequence[str] | None, cmd: Sequence[str] | None) -> str:
    """The runscript of a Docker image: ENTRYPOINT + (arguments, or CMD when there are none).

    By default arguments are evaluated by the shell, as Apptainer does; with
    ``APPTAINER_NO_EVAL`` (or ``SINGULARITY_NO_EVAL``) set they are passed exactly.
    """
    exact_cmd = " ".join(shlex.quote(a) for a in cmd or [])
    exact_entry = " ".join(shlex.quote(a) for a in entrypoint or [])
    return f"""#!/bin/sh
OCI_ENTRYPOINT={_quoted_args(entrypoint)}
OCI_CMD={_quoted_args(cmd)}

if [ -n "${{APPTAINER_NO_EVAL:-${{SINGULARITY_NO_EVAL:-}}}}" ]; then
    if [ $# -eq 0 ]; then
        set -- {exact_cmd}
    fi
    set -- {exact_entry} "$@"
    exec "$@"
fi

# Apptainer's default: ENTRYPOINT and CMD (or the arguments) are evaluated by the shell.
CMDLINE_ARGS=""
for arg in "$@"; do
    CMDLINE_ARGS="${{CMDLINE_ARGS}} \\"$arg\\""
done
if [ $# -gt 0 ]; then
    SINGULARITY_OCI_RUN="${{OCI_ENTRYPOINT}} ${{CMDLINE_ARGS}}"
else
    SINGULARITY_OCI_RUN="${{OCI_ENTRYPOINT}} ${{OCI_CMD}}"
fi
eval "set ${{SINGULARITY_OCI_RUN}}"
exec "$@"
"""


def _put(root: Dir, rel: str, data: str | bytes, mode: int) -> bool:
    """Replace ``root/rel`` with a new file: a rename, so a linked file is never written
    through, and a symlink of the image is replaced, never followed. A parent that is not a
    real folder (the image's own symlink or file) is left alone: False."""
    folder, _, name = rel.rpartition("/")
    try:
        parent = root.sub(folder, create=True)
    except UnsafePath:
        return False
    with parent:
        if parent.is_dir(name):
            parent.remove(name)
        parent.write_file(name, data.encode() if isinstance(data, str) else data, mode)
    return True


def write(root: Dir, config: ImageConfig) -> None:
    """Add the Apptainer files for an image to its flat tree ``root``."""
    for rel in DIRS:
        with contextlib.suppress(UnsafePath):       # the image's own symlink stays
            root.sub(rel, create=True).close()
    for name, target in LINKS.items():
        if root.lstat(name) is None:
            root.new_symlink(name, target)
    _put(root, "etc/hosts", b"", 0o644)
    _put(root, "etc/resolv.conf", b"", 0o644)
    for name, text in ACTIONS.items():
        _put(root, f".singularity.d/actions/{name}", text, 0o755)
    for name, text in ENV_FILES.items():
        _put(root, f".singularity.d/env/{name}", text, 0o755)
    _put(root, ".singularity.d/env/10-docker2singularity.sh", env_script(config.env), 0o755)
    _put(root, ".singularity.d/runscript", runscript(config.entrypoint, config.cmd), 0o755)
    _put(root, ".singularity.d/startscript", "#!/bin/sh\n", 0o755)
    labels = json.dumps(config.labels, indent="\t", sort_keys=True)
    _put(root, ".singularity.d/labels.json", labels, 0o644)
