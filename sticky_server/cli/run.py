"""``sticky-server TARGET``: the master serves, each worker imports TARGET and serves it.

    sticky-server main:app --workers 4 --bind 0.0.0.0:8000
    sticky-server main:app --host 0.0.0.0 --port 8000 --proxy-headers --forwarded-allow-ips '*'
    sticky-server -c sticky.toml main:app --check-config

The same command runs in the master and, started again by it, in every worker (as
any entry script does). The master never imports TARGET unless ``--preload`` asks
(an app's import-time side effects and memory stay out of it); each worker imports
it, tells its kind (``target.detect_kind``) and serves it. A TARGET that does not
import is still caught before the server says it is up: the first worker to fail
prints the error (worker 0 with the app's own traceback), the server stops
starting, and the command exits 1.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import logging.config
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapters._extras import MissingExtraError
from ..balancer import BALANCERS, Balancer
from ..errors import PidFileError, StickyServerError
from ..listener import DEFAULT_UNIX_SOCKET_MODE, parse_bind
from ..master.metrics import MetricsServer
from ..master.pidfile import remove_pid_file, stats_file_of, stats_writer, write_pid_file
from ..server import StickyServer
from ..settings import ServerSettings
from ..worker.environment import worker_identity
from ..worker.session import EXIT_BOOT_FAILURE
from .boot_report import boot_report_file, first_to_report
from .gunicorn_hooks import HookServer, HookWorker, run_hook
from .options import UsageError, build_parser
from .reload import Reloader
from .settings import format_settings, in_cli_terms, parse_settings
from .status import status
from .target import check_tls, detect_kind, import_target, make_worker, print_user_error

__all__ = ["EXIT_IMPORT", "main"]

EXIT_IMPORT = 1
# The loggers that write one line per request, quietened by --no-access-log.
ACCESS_LOGGERS = ("sticky_server.access", "uvicorn.access", "aiohttp.access", "tornado.access")
logger = logging.getLogger("sticky_server.cli")
LOG_FORMAT = "%(asctime)s [%(process)d] %(name)s %(levelname)s %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return status(argv[1:])
    _load_env_file(argv)
    args = parse_settings(argv, dict(os.environ))
    if args.check_config:
        try:
            server_settings(args)  # what a start would refuse, refused here
        except (UsageError, ValueError, TypeError) as exc:
            build_parser().error(in_cli_terms(str(exc)))
        sys.stdout.write(format_settings(args))
        return 0
    for name, value in args.env or ():
        os.environ[name] = value  # -e: the workers inherit it
    if args.umask is not None:
        os.umask(args.umask)
    _set_up_logging(args)
    if args.chdir:
        try:
            os.chdir(args.chdir)
        except OSError as exc:
            build_parser().error(f"--chdir {args.chdir}: {exc.strerror}")
    try:
        sticky = _server(args)
        check_tls(args)  # a bad certificate stops here, before any worker starts
    except (UsageError, ValueError, TypeError, OSError) as exc:
        build_parser().error(in_cli_terms(str(exc)))
    _set_process_title(args, sticky)
    if not sticky.is_master:
        return _work(args, sticky)
    if args.preload:
        failed = _preload(args)
        if failed is not None:
            return failed
    return _serve(args, sticky)


def _load_env_file(argv: list[str]) -> None:
    """``--env-file FILE`` (python-dotenv): before the settings are read, so it may set STICKY_SERVER_* too."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--env-file")
    known, _ = early.parse_known_args(argv)
    path = known.env_file or os.environ.get("STICKY_SERVER_ENV_FILE")
    if not path:
        return
    parser = build_parser()
    if not Path(path).is_file():
        parser.error(f"--env-file {path}: no such file")
    try:
        from dotenv import load_dotenv
    except ImportError:
        parser.error(f"--env-file {path} needs python-dotenv: pip install 'sticky-server[cli]' (or python-dotenv)")
    load_dotenv(path, override=False)  # the real environment wins, as with uvicorn


def _set_up_logging(args: argparse.Namespace) -> None:
    if args.log_config:
        _log_config(args.log_config)
    elif args.error_logfile and args.error_logfile != "-":
        logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, filename=args.error_logfile)
    else:
        logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger().setLevel(args.log_level.upper())
    if args.access_logfile:  # gunicorn's: access lines there only, and on even with --no-access-log
        handler: logging.Handler = (
            logging.StreamHandler(sys.stdout)
            if args.access_logfile == "-"
            else logging.FileHandler(args.access_logfile)
        )
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        for name in ACCESS_LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.propagate = False
            logger.setLevel(logging.INFO)
    elif not args.access_log:
        for name in ACCESS_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _log_config(path: str) -> None:
    """uvicorn's ``--log-config``: a dictConfig in JSON or YAML, or a ``fileConfig`` INI file."""
    parser = build_parser()
    if not Path(path).is_file():
        parser.error(f"--log-config {path}: no such file")
    try:
        if path.endswith(".json"):
            with open(path) as file:
                logging.config.dictConfig(json.load(file))
        elif path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                parser.error(f"--log-config {path} needs PyYAML: pip install pyyaml (or give a JSON or INI file)")
            with open(path) as file:
                logging.config.dictConfig(yaml.safe_load(file))
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except (ValueError, TypeError, KeyError, AttributeError, ImportError, OSError) as exc:
        parser.error(f"--log-config {path}: {exc}")


def _server(args: argparse.Namespace) -> StickyServer:
    in_master = worker_identity() is None
    if (args.user is not None or args.group is not None) and in_master and os.geteuid() != 0:
        raise UsageError(
            "-u/--user and -g/--group need the master to run as root (it binds, then starts the workers as that "
            "user): run sticky-server as root, or leave them out to run everything as yourself"
        )
    return StickyServer.from_settings(server_settings(args))


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The StickyServer's settings the command's options give, checked (``--check-config`` checks them too)."""
    balancer: Balancer | str = args.balancer
    if args.balancer not in BALANCERS:
        balancer = _custom_balancer(args.balancer, args.app_dir)
    return ServerSettings(
        args.workers,
        balancer=balancer,
        graceful_timeout=args.graceful_timeout,
        timeout=args.timeout or None,
        max_connections_per_worker=args.max_requests,
        max_connections_jitter=args.max_requests_jitter,
        user=args.user,
        group=args.group,
        proxy_protocol=args.proxy_protocol,
        forwarded_header=args.forwarded_header,
        trusted_proxies=args.trusted_proxy,
        steering=args.steering,
        forwarded_header_fallback=args.forwarded_header_fallback,
        unix_socket_mode=DEFAULT_UNIX_SOCKET_MODE & ~(args.umask or 0),
        route_by=args.route_by,
        session_load_factor=args.session_load_factor,
        loop=args.loop,
        **({"backlog": args.backlog} if args.backlog else {}),
    )


def _custom_balancer(text: str, app_dir: str | None) -> Any:
    if ":" not in text:
        raise UsageError(f"--balancer must be one of {', '.join(BALANCERS)} or module:Class, got {text!r}")
    made = import_target(text, app_dir)
    try:
        balancer = made() if inspect.isclass(made) else made
    except TypeError as exc:
        raise UsageError(f"--balancer {text}: cannot create it with no arguments ({exc})") from None
    if not isinstance(balancer, Balancer):
        raise UsageError(f"--balancer {text} is a {type(balancer).__name__}, not a sticky_server.Balancer subclass")
    return balancer


def _set_process_title(args: argparse.Namespace, sticky: StickyServer) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    role = "master" if sticky.is_master else f"worker {sticky.worker_id}"
    setproctitle(f"sticky-server: {role} [{args.name or args.target}]")


def _work(args: argparse.Namespace, sticky: StickyServer) -> int:
    """In a worker: import TARGET, make its worker, serve. A failure before READY ends the start-up."""
    slot = sticky.worker_id
    assert slot is not None
    server, me = HookServer(args, sticky.workers, master_pid=os.getppid()), HookWorker(args, slot)
    run_hook(args.hooks, "post_fork", server, me)
    try:
        target = import_target(args.target, args.app_dir)
        worker = make_worker(args, target, sticky)
    except (UsageError, MissingExtraError) as exc:
        if first_to_report():
            print(f"sticky-server: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILURE
    except Exception as exc:
        if first_to_report():  # every worker fails the same way: one traceback is enough
            print_user_error(f"sticky-server: importing {args.target} failed:", exc)
        return EXIT_BOOT_FAILURE
    run_hook(args.hooks, "post_worker_init", me)
    try:
        sticky.work(worker)
    finally:
        run_hook(args.hooks, "worker_exit", server, me)
    return 0


def _preload(args: argparse.Namespace) -> int | None:
    """``--preload``: import TARGET in the master first, as gunicorn does; an exit code if that fails."""
    try:
        target = import_target(args.target, args.app_dir)
        if not args.kind and not args.factory:
            detect_kind(target)
    except UsageError as exc:
        build_parser().error(str(exc))
    except Exception as exc:
        print_user_error(f"sticky-server: importing {args.target} failed:", exc)
        return EXIT_IMPORT
    return None


def _serve(args: argparse.Namespace, sticky: StickyServer) -> int:
    parser = build_parser()
    metrics = None
    if args.metrics:
        try:
            metrics = MetricsServer(parse_bind(args.metrics), sticky.stats)
        except (OSError, ValueError) as exc:
            parser.error(f"--metrics {args.metrics}: {exc}")
    pid_file = Path(args.pid) if args.pid else None
    pid_lock = None
    if pid_file is not None:
        try:
            pid_lock = write_pid_file(pid_file)
        except (OSError, PidFileError) as exc:
            if metrics is not None:
                metrics.close()
            parser.error(f"--pid {pid_file}: {exc}" if isinstance(exc, OSError) else str(exc))
        sticky.on_stats(stats_writer(stats_file_of(pid_file)))
    reloader = None
    if args.reload:
        reloader = Reloader(
            args.reload_dir or [args.app_dir or os.getcwd()],
            include=args.reload_include or (),
            exclude=args.reload_exclude or (),
        )
        sticky.on_listening(lambda address: reloader.start() if reloader is not None else None)
    server = HookServer(args, sticky.workers)
    run_hook(args.hooks, "on_starting", server)
    sticky.on_listening(lambda address: run_hook(args.hooks, "when_ready", server))
    for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)  # systemd's sockets are the master's; workers must not take them
    try:
        with boot_report_file():
            sticky.listen_on(args.bind)
    except StickyServerError as exc:  # it says what went wrong and what to do: no traceback
        print(f"sticky-server: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a setting the listeners show impossible (--steering kernel here)
        parser.error(in_cli_terms(str(exc)))
    finally:
        if reloader is not None:
            reloader.stop()
        if metrics is not None:
            metrics.close()
        if pid_file is not None:
            remove_pid_file(pid_file, pid_lock)
        run_hook(args.hooks, "on_exit", server)
    return 0
