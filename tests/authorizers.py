"""An authorizer for a jupyter-server in the tests: callers sending ``X-Test-Role: guest`` may
do nothing with kernels (as a deployment's own authorizer could decide)."""

from jupyter_server.auth.authorizer import Authorizer


class GuestsMayNotTouchKernels(Authorizer):
    def is_authorized(self, handler, user, action, resource):  # type: ignore[no-untyped-def]
        guest = handler.request.headers.get("X-Test-Role") == "guest"
        return not (guest and resource == "kernels")
