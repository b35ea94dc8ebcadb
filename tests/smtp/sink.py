"""A real SMTP server for the email tests (aiosmtpd, Debian's python3-aiosmtpd).

    sink.py PORT DIR CERT KEY USER PASSWORD

Listens on 127.0.0.1:PORT, requires STARTTLS (CERT/KEY) and then AUTH (USER/PASSWORD),
and writes each message it accepts to DIR as N.eml (the bytes received) and N.json
(the envelope). Recipients starting with "reject" are refused for good (550); those
starting with "tempfail" are refused once (451), then accepted. Prints "ready" once
listening, and runs until killed.
"""

import json
import logging
import os
import ssl
import sys
import threading
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

# aiosmtpd's own use of its deprecated `login_data` warns on every login.
warnings.filterwarnings("ignore", category=DeprecationWarning)
logging.getLogger("mail.log").setLevel(logging.ERROR)

port, folder, cert, key, user, password = sys.argv[1:7]


class Sink:
    def __init__(self):
        self.count = 0
        self.tries = {}
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 no such mailbox here"
        if address.startswith("tempfail"):
            with self.lock:
                n = self.tries.get(address, 0)
                self.tries[address] = n + 1
            if n == 0:
                return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.count += 1
            n = self.count
        base = os.path.join(folder, str(n))
        with open(base + ".eml.part", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json", "w") as f:
            json.dump(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "tls": session.ssl is not None,
                    "login": getattr(session, "gg_login", None),
                },
                f,
            )
        # Renamed last: a reader never sees half a message.
        os.rename(base + ".eml.part", base + ".eml")
        return "250 Message accepted for delivery"


def authenticate(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == user.encode()
        and auth_data.password == password.encode()
    )
    if ok:
        session.gg_login = user
    return AuthResult(success=ok)


context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
controller = Controller(
    Sink(),
    hostname="127.0.0.1",
    port=int(port),
    tls_context=context,
    require_starttls=True,
    authenticator=authenticate,
    auth_required=True,
    auth_require_tls=True,
)
controller.start()
print("ready", flush=True)
threading.Event().wait()
