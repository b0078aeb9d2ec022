"""FAULT INJECTION ONLY: a stand-in org.freedesktop.login1 on a private test bus.

Real logind is tested too (test_daemon_logind.py); this one exists to make logind
misbehave on purpose.  Usage: ``python fake_login1.py BUS_ADDRESS MODE RECORD_FILE``.
MODE: ``ok`` (hand out a pipe like logind and record when the caller closes it), ``deny``
(AccessDenied), ``hang`` (never answer), ``nofd`` (claim fd index 0 without sending one).
Each call and release is appended to RECORD_FILE as one line.  "ready" is printed on
stdout once the name is owned.
"""

import os
import sys

from gi.repository import Gio, GLib

INTERFACE = """
<node>
  <interface name="org.freedesktop.login1.Manager">
    <method name="Inhibit">
      <arg type="s" name="what" direction="in"/>
      <arg type="s" name="who" direction="in"/>
      <arg type="s" name="why" direction="in"/>
      <arg type="s" name="mode" direction="in"/>
      <arg type="h" name="pipe_fd" direction="out"/>
    </method>
  </interface>
</node>
"""


def main() -> None:
    address, mode, record = sys.argv[1:4]
    loop = GLib.MainLoop()
    held = []  # invocations kept unanswered in "hang" mode

    def note(line: str) -> None:
        with open(record, "a") as f:
            f.write(line + "\n")

    def on_call(connection, sender, path, interface, method, params, invocation):
        what, who, why, how = params.unpack()
        note(f"inhibit {what}|{who}|{why}|{how}")
        if mode == "deny":
            invocation.return_dbus_error("org.freedesktop.DBus.Error.AccessDenied", "fake logind says no")
        elif mode == "hang":
            held.append(invocation)
        elif mode == "nofd":
            invocation.return_value(GLib.Variant("(h)", (0,)))
        else:
            read_end, write_end = os.pipe()
            fds = Gio.UnixFDList.new()
            fds.append(write_end)
            os.close(write_end)

            def on_hangup(fd, condition):
                note("released")
                os.close(fd)
                return False

            GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, read_end, GLib.IOCondition.HUP, on_hangup)
            invocation.return_value_with_unix_fd_list(GLib.Variant("(h)", (0,)), fds)

    connection = Gio.DBusConnection.new_for_address_sync(
        address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None, None)
    info = Gio.DBusNodeInfo.new_for_xml(INTERFACE).interfaces[0]
    connection.register_object("/org/freedesktop/login1", info, on_call, None, None)
    reply = connection.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                 "RequestName", GLib.Variant("(su)", ("org.freedesktop.login1", 4)),
                                 GLib.VariantType.new("(u)"), Gio.DBusCallFlags.NONE, 5000, None)
    if reply.unpack()[0] != 1:
        raise SystemExit("could not own org.freedesktop.login1")
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
