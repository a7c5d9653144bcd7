"""Start the Nekoya GUI. The flags are kohya_ss's (``kohya_gui.py``), so scripts keep working.

    python launch.py [--listen 127.0.0.1] [--server_port 7860] [--inbrowser] [--share]
                     [--headless] [--root_path PATH] [--username U --password P]
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


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
    p.add_argument("--password", default="", help="password for the GUI's login (with --username)")
    p.add_argument("--allow-no-auth", dest="allow_no_auth", action="store_true",
                   help="allow --listen on a non-local address or --share without --username/--password")
    p.add_argument("--debug", action="store_true", help="more logging")
    return p


def exposure_problems(args: argparse.Namespace) -> list[str]:
    """Refuse to expose an unprotected training GUI to the network unless told to."""
    if bool(args.username) != bool(args.password):
        return ["--username and --password go together: give both or neither."]
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
    problems = exposure_problems(args)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.share and not args.do_not_share:
        print("warning: --share makes a public link; anyone with it can use this GUI and your files.", file=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    )


if __name__ == "__main__":
    sys.exit(main())
