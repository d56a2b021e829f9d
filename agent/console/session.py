"""The technician console's interpreter, sans-I/O: bytes in, bytes out, clock injected.

A :class:`Session` is driven by a transport (:mod:`agent.console.serial_loop`) that hands it
what arrived on the line (:meth:`Session.feed`), calls :meth:`Session.tick` when nothing did
(timeouts) and :meth:`Session.disconnect` when the line is lost. It reads and changes the
device only through :class:`agent.console.device.Device`.

Answers: ``key=value`` lines, then one final line ``OK [message]`` or ``ERR code message``
(``mode json``: one JSON object per answer). Prompts (``login:``, ``password:``, ``>``) are
printed only while echo is on; ``echo off`` is for scripts (no echo, no prompts).

Nothing is changed before a login, and nothing by a line that is noise, overlong, mistyped or
malformed. A change (``set``, ``profile load`` / ``rollback``, ``provision``, ``passwd``,
``restart``) is shown first and applied only by a following ``confirm`` line (any other line
cancels it and is not run), or at once with ``--yes`` at the end of the command.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import structlog

from agent.console.device import MAX_PROFILE_BYTES, Change, ConsoleError, Device, Fields
from agent.console.lines import LineAssembler, LineEvent, LineKind
from agent.console.settings import SETTINGS, read_settings
from agent.errors import AgentError

log = structlog.get_logger(__name__)

DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_PASTE_TIMEOUT_S = 60.0
PROFILE_TERMINATOR = "."
MAX_PASTE_LINES = 5000
LOG_TAIL_DEFAULT, LOG_TAIL_MAX = 20, 200


class State(Enum):
    LOGIN = "login"
    PASSWORD = "password"  # noqa: S105 (a state, not a password)
    COMMAND = "command"
    CONFIRM = "confirm"
    PASTE = "paste"
    CURRENT_PASSWORD = "current_password"  # noqa: S105
    NEW_PASSWORD = "new_password"  # noqa: S105
    NEW_PASSWORD_AGAIN = "new_password_again"  # noqa: S105


@dataclass(frozen=True, slots=True)
class Command:
    words: tuple[str, ...]
    args: str  # usage of the arguments
    summary: str
    detail: str
    min_args: int = 0
    max_args: int = 0
    changes: bool = False  # takes --yes; confirmed; leaves a maintenance record

    @property
    def usage(self) -> str:
        text = " ".join(self.words) + (f" {self.args}" if self.args else "")
        return text + (" [--yes]" if self.changes else "")


COMMANDS: tuple[Command, ...] = (
    Command(("help",), "[COMMAND]", "list the commands, or explain one", "", 0, 2),
    Command(
        ("status",),
        "",
        "terminal, software, profile, readers, PSAMs, queue, lists, clock",
        "Terminal id, software version, profile name and SHA-256; from the running agent's "
        "status file: the agent (pid, start, last tap, clock), the reader and whether a card is "
        "present, each PSAM's serial, terminal number and applications (agent=not running, "
        "with the reason, when the file is stale); settings and the line and stop in force; "
        "records queued and acknowledged, blacklist and parameter versions and expiry, clock.",
    ),
    Command(
        ("selftest",),
        "",
        "store, chain, clock, disk, profile, agent, reader, PSAMs",
        "Runs every check and answers check.NAME=ok|fail; ERR selftest_failed if any failed. "
        "The reader and PSAM checks use the running agent's status file (it holds them): a "
        "stale or missing file (agent stopped, gone, or silent for too long) fails them.",
    ),
    Command(
        ("provision",),
        "[TERMINAL_ID]",
        "show the device key; create it if absent",
        "Without an argument: the terminal id and the device's public key. With TERMINAL_ID on "
        "a new device: create the device key (Ed25519, 0600) and identity, print the public key.",
        0,
        1,
        changes=True,
    ),
    Command(
        ("provision", "code"),
        "CODE",
        "store the clearing host's one-time enrolment code",
        "Writes CODE to DATA_DIR/enrolment.code (0600), the file 'cardsync run "
        "--enrolment-code-file' reads. The code is never shown, logged or recorded.",
        1,
        1,
        changes=True,
    ),
    Command(("get",), "[KEY]", "show the terminal settings", "", 0, 1),
    Command(
        ("set",),
        "KEY VALUE",
        "change a terminal setting",
        "Settings: "
        + "; ".join(f"{s.name}: {s.help}" for s in SETTINGS.values())
        + ". The value is validated before anything is written.",
        2,
        2,
        changes=True,
    ),
    Command(
        ("profile", "load"),
        "",
        "paste a firmware profile, end with a line '.'",
        "Paste the whole profile TOML, then a line holding only '.'. It is validated whole "
        "(errors name the line), then shown; after 'confirm' it replaces DATA_DIR/profile.toml "
        "atomically and the old one is kept for 'profile rollback'. In force after 'restart'.",
        changes=True,
    ),
    Command(
        ("profile", "rollback"),
        "",
        "put the previous profile back in force",
        "",
        changes=True,
    ),
    Command(
        ("sync", "now"),
        "",
        "ask the sync daemon to upload now",
        "Creates DATA_DIR/sync.flush, as 'cardsync flush' does.",
    ),
    Command(("log", "tail"), "[N]", f"the last N log lines (1..{LOG_TAIL_MAX})", "", 0, 1),
    Command(("records", "verify"), "", "verify the record chain and signatures", ""),
    Command(
        ("keys", "rotate"),
        "",
        "create a new device key (key rotation)",
        "Creates DATA_DIR/device.key.next and asks the agent to restart: from its start it "
        "signs new records with the new key. The old key is kept until the sync daemon has had "
        "every record it signed acknowledged and the clearing host has accepted the new key "
        "(an operator authorises it: cardhost terminal rotate-key ID --public-key HEX, or a "
        "one-time code stored with 'provision code'). Only public keys are shown.",
        changes=True,
    ),
    Command(
        ("restart",),
        "",
        "ask the agent to restart",
        "Creates DATA_DIR/agent.restart: the agent finishes the tap in progress, exits with "
        "status 75 and its service manager starts it again with the new profile and settings.",
        changes=True,
    ),
    Command(
        ("passwd",),
        "",
        "change your password",
        "Asks for the current password (a wrong one counts towards the lockout), then the new "
        "one twice; none of them is echoed.",
        changes=True,
    ),
    Command(("echo",), "on|off", "echo and prompts (off for scripts)", "", 1, 1),
    Command(("mode",), "text|json", "answers as key=value lines or one JSON object", "", 1, 1),
    Command(("logout",), "", "end the session", ""),
    Command(("quit",), "", "end the session", ""),
)


_SECRET_STATES = frozenset(
    {State.PASSWORD, State.CURRENT_PASSWORD, State.NEW_PASSWORD, State.NEW_PASSWORD_AGAIN}
)
_CHANGE_STATES = frozenset(
    {State.CONFIRM, State.CURRENT_PASSWORD, State.NEW_PASSWORD, State.NEW_PASSWORD_AGAIN}
)
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)


def _find(words: list[str]) -> tuple[Command | None, list[str]]:
    best: Command | None = None
    for command in COMMANDS:
        n = len(command.words)
        if tuple(words[:n]) == command.words and (best is None or n > len(best.words)):
            best = command
    if best is None:
        return None, words
    return best, words[len(best.words) :]


def _clean(value: str) -> str:
    return "".join(c if c.isprintable() else " " for c in value)


class Session:
    """One console session on one line (re-used across reconnects)."""

    def __init__(
        self,
        device: Device,
        clock: Callable[[], float],
        *,
        idle_timeout_s: float | None = None,
        paste_timeout_s: float = DEFAULT_PASTE_TIMEOUT_S,
        echo: bool = True,
    ) -> None:
        self.device = device
        self.clock = clock
        self._idle_override = idle_timeout_s
        self.paste_timeout_s = paste_timeout_s
        self.lines = LineAssembler()
        self.lines.echo = echo
        self.json = False
        self.state = State.LOGIN
        self.user = ""
        self._name = ""
        self._pending: Change | None = None
        self._paste: list[str] = []
        self._paste_problem: tuple[int, str, str] | None = None
        self._paste_size = 0
        self._paste_yes = False
        self._new_password = ""
        self._password_yes = False
        self._last_input = clock()
        self.idle_timeout_s = self._read_idle_timeout()

    # --- driving -------------------------------------------------------------------------

    def _read_idle_timeout(self) -> float:
        """The override, else the ``console_timeout_s`` setting (read at each login)."""
        if self._idle_override is not None:
            return self._idle_override
        value = read_settings(self.device.path).get("console_timeout_s")
        return float(value) if value else DEFAULT_IDLE_TIMEOUT_S

    def open(self) -> bytes:
        """The greeting when the line comes up."""
        return self._out(["cardagent console: log in"], prompt=True)

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        if data:
            self._last_input = self.clock()
        while data:
            fed = self.lines.feed(data)
            data = data[fed.consumed :]
            out += fed.echo
            if fed.event is not None:
                out += self._event(fed.event)
        return bytes(out)

    def tick(self) -> bytes:
        """Timeouts: a paste or a confirmation left waiting, an idle session."""
        idle = self.clock() - self._last_input
        if self.state is State.PASTE and idle >= self.paste_timeout_s:
            count = len(self._paste)
            self._reset_pending()
            self.state = State.COMMAND
            log.warning("console_paste_timeout", lines=count, who=self.user)
            return self._answer(
                self._err(
                    "paste_timeout",
                    f"profile cut short: no terminator line '.' after {count} lines in "
                    f"{self.paste_timeout_s:.0f} s; nothing changed",
                )
            )
        if self.state is State.PASSWORD and idle >= self.paste_timeout_s:
            self._name = ""  # a name typed and left: the next line is not its password
            self.state = State.LOGIN
            return self._answer(self._err("timeout", "login timed out; log in again"))
        if self.state is State.CONFIRM and idle >= self.paste_timeout_s:
            self._reset_pending()
            self.state = State.COMMAND
            return self._answer(self._err("cancelled", "no confirmation in time; nothing changed"))
        if self.state not in (State.LOGIN, State.PASSWORD) and idle >= self.idle_timeout_s:
            who = self.user
            self._logout()
            log.info("console_session_timeout", who=who)
            return self._answer(
                self._err("timeout", f"session closed after {self.idle_timeout_s:.0f} s idle")
            )
        return b""

    def disconnect(self) -> None:
        """The line is gone (cable pulled, adapter unplugged): whatever was half typed, pasted
        or awaiting confirmation is dropped, and the session is logged out."""
        if self.state is not State.LOGIN or self.user:
            log.warning("console_disconnected", who=self.user, state=self.state.value)
        self._logout()

    # --- output ----------------------------------------------------------------------------

    def _prompt(self) -> str:
        if not self.lines.echo:
            return ""
        return {
            State.LOGIN: "login: ",
            State.PASSWORD: "password: ",
            State.COMMAND: "> ",
            State.CONFIRM: "confirm? ",
            State.CURRENT_PASSWORD: "current password: ",
            State.NEW_PASSWORD: "new password: ",
            State.NEW_PASSWORD_AGAIN: "new password again: ",
            State.PASTE: "",
        }[self.state]

    def _out(self, lines: list[str], *, prompt: bool) -> bytes:
        text = "".join(f"{line}\r\n" for line in lines)
        self.lines.secret = self.state in _SECRET_STATES
        return (text + (self._prompt() if prompt else "")).encode("utf-8")

    def _answer(self, answer: tuple[Fields, bool, str, str]) -> bytes:
        fields, ok, code, message = answer
        if self.json:
            data: dict[str, object] = {}
            for key, value in fields:
                if key in data:
                    existing = data[key]
                    before = existing if isinstance(existing, list) else [existing]
                    data[key] = [*before, value]
                else:
                    data[key] = value
            obj: dict[str, object] = {"ok": ok, "data": data}
            if not ok:
                obj["error"] = code
            if message:
                obj["message"] = message
            return self._out([json.dumps(obj, ensure_ascii=False)], prompt=True)
        lines = [f"{key}={_clean(value)}" for key, value in fields]
        final = f"OK {message}".rstrip() if ok else f"ERR {code} {_clean(message)}"
        return self._out([*lines, final], prompt=True)

    @staticmethod
    def _ok(fields: Fields | None = None, message: str = "") -> tuple[Fields, bool, str, str]:
        return fields or [], True, "", message

    @staticmethod
    def _err(
        code: str, message: str, fields: Fields | None = None
    ) -> tuple[Fields, bool, str, str]:
        return fields or [], False, code, message

    # --- events ----------------------------------------------------------------------------

    def _event(self, event: LineEvent) -> bytes:
        try:
            return self._dispatch(event)
        except ConsoleError as exc:
            return self._answer(self._err(exc.code, exc.message, exc.fields))
        except AgentError as exc:
            return self._answer(self._err(exc.party, str(exc)))
        except Exception as exc:  # a bug must not take the console down; it is logged
            log.exception("console_bug")
            self._reset_pending()
            self.state = State.COMMAND if self.user else State.LOGIN
            return self._answer(self._err("internal", f"console bug: {type(exc).__name__}"))

    def _dispatch(self, event: LineEvent) -> bytes:
        if self.state is State.PASTE:
            return self._paste_event(event)
        if event.kind is LineKind.INTERRUPT:
            if self.state in _CHANGE_STATES:
                self._reset_pending()
                self.state = State.COMMAND
                return self._answer(self._err("cancelled", "interrupted; nothing changed"))
            if self.state is State.PASSWORD:
                self.state = State.LOGIN
            return self._out([], prompt=True)
        if event.kind is not LineKind.LINE:
            if self.state in _CHANGE_STATES:
                self._reset_pending()
                self.state = State.COMMAND
            elif self.state is State.PASSWORD:
                self.state = State.LOGIN
            code = "noise" if event.kind is LineKind.NOISE else "overlong"
            log.warning("console_bad_line", kind=code, detail=event.text)
            return self._answer(self._err(code, f"{event.text}; line ignored, nothing changed"))
        return self._line(event.text)

    def _line(self, text: str) -> bytes:
        state = self.state
        if state is State.LOGIN:
            return self._login_name(text.strip())
        if state is State.PASSWORD:
            return self._login_password(text)
        if state is State.CONFIRM:
            return self._confirm(text.strip())
        if state is State.CURRENT_PASSWORD:
            self.state = State.COMMAND
            ok, retry_after, failures = self.device.check_password(self.user, text)
            if not ok:
                log.warning("console_passwd_refused", who=self.user, failures=failures)
                if retry_after > 0:
                    return self._answer(self._locked(retry_after))
                return self._answer(self._err("auth", "wrong password; nothing changed"))
            self.state = State.NEW_PASSWORD
            return self._out([], prompt=True)
        if state is State.NEW_PASSWORD:
            self._new_password = text
            self.state = State.NEW_PASSWORD_AGAIN
            return self._out([], prompt=True)
        if state is State.NEW_PASSWORD_AGAIN:
            first, self._new_password = self._new_password, ""
            self.state = State.COMMAND
            if text != first:
                return self._answer(self._err("bad_value", "the passwords differ; nothing changed"))
            return self._propose(self.device.plan_password(self.user, text), self._password_yes)
        return self._command(text)

    def _login_name(self, name: str) -> bytes:
        if not name:
            return self._out([], prompt=True)
        # locked or not, the password is asked for (and not tried while locked): one answer per
        # attempt, and a password is never taken for a name
        self._name = name
        self.state = State.PASSWORD
        return self._out([], prompt=True)

    def _locked(self, seconds: float) -> tuple[Fields, bool, str, str]:
        wait = f"{seconds:.0f}"
        return self._err(
            "locked",
            f"too many failed logins; the console is locked for {wait} s",
            [("retry_after_s", wait)],
        )

    def _login_password(self, password: str) -> bytes:
        name, self._name = self._name, ""
        self.state = State.LOGIN
        ok, retry_after, failures = self.device.check_password(name, password)
        if ok:
            self.user = name
            self.state = State.COMMAND
            self.idle_timeout_s = self._read_idle_timeout()
            log.info("console_login", who=name)
            return self._answer(
                self._ok(
                    [("technician", name), ("session_timeout_s", f"{self.idle_timeout_s:.0f}")],
                    "logged in",
                )
            )
        shown = name if _NAME.fullmatch(name) else "(not a name)"  # a password typed too early
        log.warning("console_login_failed", name=shown, failures=failures)
        if retry_after > 0:
            return self._answer(self._locked(retry_after))
        return self._answer(self._err("auth", "login failed: unknown name or wrong password"))

    def _logout(self) -> None:
        self._reset_pending()
        self.lines.reset()
        self.user = ""
        self._name = ""
        self.state = State.LOGIN

    def _reset_pending(self) -> None:
        self._pending = None
        self._paste = []
        self._paste_problem = None
        self._paste_size = 0
        self._new_password = ""

    # --- commands --------------------------------------------------------------------------

    def _command(self, text: str) -> bytes:
        words = text.split()
        if not words:
            return self._out([], prompt=True)
        yes = words[-1] == "--yes"
        if yes:
            words = words[:-1]
        command, args = _find(words)
        if command is None:
            family = [c.usage for c in COMMANDS if c.words[0] == words[0]]
            if family:
                return self._answer(self._err("usage", "one of: " + "; ".join(family)))
            return self._answer(
                self._err("unknown_command", f"unknown command {words[0][:40]!r}; try 'help'")
            )
        if yes and not command.changes:
            return self._answer(self._err("usage", f"--yes: '{command.usage}' changes nothing"))
        if any(a.startswith("--") for a in args):
            return self._answer(self._err("usage", f"unknown option; usage: {command.usage}"))
        if not command.min_args <= len(args) <= command.max_args:
            return self._answer(
                self._err("usage", f"{len(args)} argument(s) given; usage: {command.usage}")
            )
        handler = getattr(self, "_do_" + "_".join(command.words))
        result: bytes = handler(args, yes)
        return result

    def _propose(self, change: Change, yes: bool) -> bytes:
        if yes:
            return self._apply(change)
        self._pending = change
        self.state = State.CONFIRM
        fields: Fields = [
            ("change", change.what),
            *change.shown,
            ("old", change.old),
            ("new", change.new),
            ("confirm", "required"),
        ]
        return self._answer(self._ok(fields, "type 'confirm' to apply, anything else cancels"))

    def _confirm(self, text: str) -> bytes:
        change, self._pending = self._pending, None
        self.state = State.COMMAND
        if change is None or text != "confirm":
            return self._answer(self._err("cancelled", "change not applied; nothing changed"))
        return self._apply(change)

    def _apply(self, change: Change) -> bytes:
        applied = self.device.commit(change, self.user)
        return self._answer(self._ok([("change", change.what), *applied], "applied"))

    def _do_help(self, args: list[str], yes: bool) -> bytes:
        if not args:
            fields = [("command", f"{c.usage} -- {c.summary}") for c in COMMANDS]
            return self._answer(self._ok(fields, "'help COMMAND' explains one"))
        command, rest = _find(args)
        matches = [c for c in COMMANDS if c.words[0] == args[0]]
        if command is None or rest:
            if not matches:
                return self._answer(self._err("unknown_command", f"no command {args[0][:40]!r}"))
            return self._answer(self._ok([("usage", c.usage) for c in matches]))
        fields = [("usage", command.usage), ("summary", command.summary)]
        if command.detail:
            fields.append(("detail", command.detail))
        if command.changes:
            fields.append(("confirm", "shown first; 'confirm' applies it, or --yes"))
        return self._answer(self._ok(fields))

    def _do_status(self, args: list[str], yes: bool) -> bytes:
        return self._answer(self._ok(self.device.status()))

    def _do_selftest(self, args: list[str], yes: bool) -> bytes:
        fields, failures = self.device.selftest()
        if failures:
            return self._answer(self._err("selftest_failed", f"{failures} check(s) failed", fields))
        return self._answer(self._ok(fields, "all checks passed"))

    def _do_provision(self, args: list[str], yes: bool) -> bytes:
        if not args:
            if not self.device.provisioned():
                return self._answer(
                    self._err("not_provisioned", "no device key yet: provision TERMINAL_ID")
                )
            return self._answer(self._ok(self.device.public_key_fields()))
        return self._propose(self.device.plan_provision(args[0]), yes)

    def _do_provision_code(self, args: list[str], yes: bool) -> bytes:
        return self._propose(self.device.plan_enrolment_code(args[0]), yes)

    def _do_get(self, args: list[str], yes: bool) -> bytes:
        fields = self.device.get_settings()
        if args:
            fields = [(k, v) for k, v in fields if k == args[0]]
            if not fields:
                return self._answer(self._err("bad_value", f"unknown setting {args[0][:40]!r}"))
        return self._answer(self._ok(fields))

    def _do_set(self, args: list[str], yes: bool) -> bytes:
        return self._propose(self.device.plan_set(args[0], args[1]), yes)

    def _do_profile_load(self, args: list[str], yes: bool) -> bytes:
        self._reset_pending()
        self._paste_yes = yes
        self.state = State.PASTE
        fields = [("paste", "profile"), ("terminator", PROFILE_TERMINATOR)]
        return self._answer(self._ok(fields, "paste the profile now, then a line '.'"))

    def _paste_event(self, event: LineEvent) -> bytes:
        number = len(self._paste) + 1
        if event.kind is LineKind.INTERRUPT:
            self._reset_pending()
            self.state = State.COMMAND
            return self._answer(self._err("cancelled", "profile load interrupted; nothing changed"))
        if event.kind is LineKind.LINE and event.text.strip() == PROFILE_TERMINATOR:
            return self._paste_done()
        if event.kind is not LineKind.LINE:
            if self._paste_problem is None:
                code = "noise" if event.kind is LineKind.NOISE else "overlong"
                self._paste_problem = (number, code, event.text)
            self._paste.append("")
            return b""
        self._paste_size += len(event.text.encode("utf-8")) + 1
        if self._paste_problem is None and len(self._paste) >= MAX_PASTE_LINES:
            self._paste_problem = (number, "profile_invalid", f"more than {MAX_PASTE_LINES} lines")
        if self._paste_problem is None and self._paste_size > MAX_PROFILE_BYTES:
            self._paste_problem = (number, "profile_invalid", f"over {MAX_PROFILE_BYTES} bytes")
        if self._paste_problem is None:
            self._paste.append(event.text)
        else:
            self._paste.append("")
        return b""

    def _paste_done(self) -> bytes:
        text = "\n".join(self._paste) + "\n"
        problem, yes = self._paste_problem, self._paste_yes
        self._reset_pending()
        self.state = State.COMMAND
        if problem is not None:
            line, code, what = problem
            return self._answer(
                self._err(
                    code, f"profile line {line}: {what}; nothing changed", [("line", str(line))]
                )
            )
        return self._propose(self.device.plan_profile(text), yes)

    def _do_profile_rollback(self, args: list[str], yes: bool) -> bytes:
        return self._propose(self.device.plan_rollback(), yes)

    def _do_sync_now(self, args: list[str], yes: bool) -> bytes:
        return self._answer(self._ok(self.device.sync_now(), "the sync daemon uploads now"))

    def _do_log_tail(self, args: list[str], yes: bool) -> bytes:
        count = LOG_TAIL_DEFAULT
        if args:
            if not args[0].isdigit() or not 1 <= int(args[0]) <= LOG_TAIL_MAX:
                return self._answer(self._err("bad_value", f"N is a number in 1..{LOG_TAIL_MAX}"))
            count = int(args[0])
        return self._answer(self._ok(self.device.log_tail(count)))

    def _do_records_verify(self, args: list[str], yes: bool) -> bytes:
        fields, problems = self.device.records_verify()
        fields += [("problem", p) for p in problems]
        if problems:
            return self._answer(self._err("records_bad", f"{len(problems)} problem(s)", fields))
        return self._answer(self._ok(fields, "chain and signatures verified"))

    def _do_keys_rotate(self, args: list[str], yes: bool) -> bytes:
        return self._propose(self.device.plan_key_rotation(), yes)

    def _do_restart(self, args: list[str], yes: bool) -> bytes:
        return self._propose(self.device.plan_restart(), yes)

    def _do_passwd(self, args: list[str], yes: bool) -> bytes:
        self._password_yes = yes
        self.state = State.CURRENT_PASSWORD
        return self._out([], prompt=True)

    def _do_echo(self, args: list[str], yes: bool) -> bytes:
        if args[0] not in ("on", "off"):
            return self._answer(self._err("usage", "echo on|off"))
        self.lines.echo = args[0] == "on"
        return self._answer(self._ok([("echo", args[0])]))

    def _do_mode(self, args: list[str], yes: bool) -> bytes:
        if args[0] not in ("text", "json"):
            return self._answer(self._err("usage", "mode text|json"))
        self.json = args[0] == "json"
        return self._answer(self._ok([("mode", args[0])]))

    def _do_logout(self, args: list[str], yes: bool) -> bytes:
        who = self.user
        self._logout()
        log.info("console_logout", who=who)
        return self._answer(self._ok([], "logged out"))

    _do_quit = _do_logout
