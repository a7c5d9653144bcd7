"""Start the Nekoya GUI. The flags are kohya_ss's (``kohya_gui.py``), so scripts keep working.

    python launch.py [--listen 127.0.0.1] [--server_port 7860] [--inbrowser] [--share]
                     [--headless] [--root_path PATH] [--username U --password P]
                     [--password-file PATH] [--allowed-hosts NAME,NAME] [--config config.toml]
                     [--language CODE] [--noverify] [--use-ipex] [--use-rocm] [--do_not_use_shell]
                     [--requirements FILE]

The password can also come from ``NEKOYA_PASSWORD`` (or a file), so it does not show in ``ps``.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PASSWORD_ENV = "NEKOYA_PASSWORD"
ALLOWED_HOSTS_ENV = "NEKOYA_ALLOWED_HOSTS"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="Nekoya: LoRA training GUI (kohya_ss-compatible flags).")
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--server_port", type=int, default=0, help="port (default 0 = 7860, or the next free one)")
    p.add_argument("--inbrowser", action="store_true", help="open the GUI in the default browser")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (needs --username/--password)")
    p.add_argument("--do_not_share", action="store_true", help="override --share")
    p.add_argument("--headless", action="store_true", help="for servers without a display: no native file dialogs")
    p.add_argument("--root_path", default=None, help="root path when served behind a reverse proxy")
    p.add_argument("--username", default="", help="user name for the GUI's login (with --password)")
    p.add_argument("--password", default="", help="password for the GUI's login (with --username); shows in the "
                   f"process list: prefer --password-file or {PASSWORD_ENV}")
    p.add_argument("--password-file", dest="password_file", default=None, metavar="PATH",
                   help="read the login password from the first line of this file")
    p.add_argument("--allowed-hosts", dest="allowed_hosts", default=os.environ.get(ALLOWED_HOSTS_ENV, ""),
                   metavar="NAME,NAME", help="more host names the browser may use to reach the GUI (behind a reverse "
                   f"proxy, a DNS name of this machine); also {ALLOWED_HOSTS_ENV}")
    p.add_argument("--allow-no-auth", dest="allow_no_auth", action="store_true",
                   help="allow --listen on a non-local address or --share without --username/--password")
    p.add_argument("--debug", action="store_true", help="more logging")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="kohya_ss's GUI defaults file (config.toml): its values pre-fill the form")
    # kohya_ss's other launch flags: accepted so its scripts keep working, each answered with a line
    p.add_argument("--language", default=None, metavar="CODE", help="kohya_ss's GUI translation (Nekoya: English only)")
    p.add_argument("--noverify", action="store_true", help="kohya_ss: skip its requirements check (Nekoya has none)")
    p.add_argument("--use-ipex", dest="use_ipex", action="store_true", help="kohya_ss: Intel XPU (not supported)")
    p.add_argument("--use-rocm", dest="use_rocm", action="store_true", help="kohya_ss: AMD ROCm (not supported)")
    p.add_argument("--do_not_use_shell", action="store_true", help="kohya_ss: no shell for its subprocesses")
    p.add_argument("--requirements", default=None, metavar="FILE", help="kohya_ss: its requirements file (unused)")
    return p


def kohya_flag_notes(args: argparse.Namespace) -> list[str]:
    """One line per kohya_ss launch flag that Nekoya accepts but has nothing to do for."""
    notes = []
    if args.language:
        notes.append(f"--language {args.language}: Nekoya's GUI is in English only; the flag is ignored.")
    if args.noverify:
        notes.append("--noverify: nothing to skip; Nekoya's setup (gui.sh / setup.sh) checks its install itself.")
    if args.use_ipex:
        notes.append("--use-ipex: Intel XPU is not supported; training runs on an NVIDIA GPU (CUDA) or the CPU.")
    if args.use_rocm:
        notes.append("--use-rocm: AMD ROCm is not supported by Nekoya's setup; a ROCm build of torch may still "
                     "work, as CUDA.")
    if args.do_not_use_shell:
        notes.append("--do_not_use_shell: nothing to change; Nekoya trains in its own process and runs no shell.")
    if args.requirements:
        notes.append(f"--requirements {args.requirements}: ignored; setup.sh installs what pyproject.toml lists.")
    return notes


def gui_defaults(path: str | None):
    """The form's defaults from kohya_ss's config.toml (None without --config); prints what was applied."""
    if not path:
        return None
    from trainer.settings.gui_defaults import read_gui_defaults

    defaults = read_gui_defaults(path)
    print(f"--config {path}: {len(defaults.applied)} settings pre-fill the form ({', '.join(defaults.applied)})")
    if defaults.ignored:
        print(f"--config {path}: not Nekoya settings, not used: {', '.join(defaults.ignored)}")
    return defaults.settings


def resolve_password(args: argparse.Namespace) -> list[str]:
    """Fill ``args.password`` from --password-file, or NEKOYA_PASSWORD with --username; returns the problems found."""
    given = [name for name, value in (("--password", args.password), ("--password-file", args.password_file)) if value]
    if len(given) > 1:
        return ["--password and --password-file go separately: give one of them."]
    if args.password_file:
        path = Path(args.password_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            return [f"--password-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc}); "
                    "give a readable text file whose first line is the password."]
        args.password = lines[0] if lines else ""
        if not args.password:
            return [f"--password-file {path}: the first line is empty; write the password on it."]
    elif args.username and not args.password:
        args.password = os.environ.get(PASSWORD_ENV, "")
    return []


def exposure_problems(args: argparse.Namespace) -> list[str]:
    """Refuse to expose an unprotected training GUI to the network unless told to."""
    if bool(args.username) != bool(args.password):
        return [f"--username and a password go together: give both (the password with --password-file or "
                f"{PASSWORD_ENV}) or neither."]
    if args.username or args.allow_no_auth:
        return []
    problems = []
    if not _is_local(args.listen):
        problems.append(f"--listen {args.listen} makes the GUI reachable from other machines; add "
                        "--username and --password, or --allow-no-auth if the network is trusted.")
    if args.share and not args.do_not_share:
        problems.append("--share publishes the GUI on a public link; add --username and --password, "
                        "or --allow-no-auth to publish it without a login.")
    return problems


def _is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from_command_line = bool(args.password)
    problems = resolve_password(args) or exposure_problems(args)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.share and not args.do_not_share:
        print("warning: --share makes a public link; anyone with it can use this GUI and your files.", file=sys.stderr)
    if from_command_line:
        print(f"warning: --password shows in the process list (ps) to every user of this computer; use {PASSWORD_ENV} "
              "or --password-file instead.", file=sys.stderr)
    for note in kohya_flag_notes(args):
        print(f"note: {note}", file=sys.stderr)
    from trainer.problems import NekoyaError

    try:
        defaults = gui_defaults(args.config)
    except NekoyaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from trainer.model_libraries import stay_offline

    stay_offline()  # before gradio and huggingface_hub are imported
    from app.host_guard import split_host_list
    from app.server import launch_app  # heavy (gradio): imported after the flags are checked

    return launch_app(
        host=args.listen,
        port=args.server_port or None,
        share=args.share and not args.do_not_share,
        inbrowser=args.inbrowser,
        root_path=args.root_path,
        auth=(args.username, args.password) if args.username else None,
        headless=args.headless,
        debug=args.debug,
        allowed_hosts=split_host_list(args.allowed_hosts),
        defaults=defaults,
    )


if __name__ == "__main__":
    sys.exit(main())
