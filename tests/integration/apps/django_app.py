"""A one-file Django project (settings, a view, a URL), served as ASGI and as WSGI by the command.

sticky-server apps.django_app:asgi_application --asgi -w 4
sticky-server apps.django_app:wsgi_application --wsgi -w 4
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    SECRET_KEY="not-secret-test-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)


def index(request: HttpRequest) -> JsonResponse:
    from sticky_server import current_server

    client = request.META.get("REMOTE_ADDR")
    return JsonResponse({"worker": current_server().worker_id, "client": client, "scheme": request.scheme})


urlpatterns = [path("", index)]

from django.core.asgi import get_asgi_application  # noqa: E402 (after settings, as Django requires)
from django.core.wsgi import get_wsgi_application  # noqa: E402

asgi_application = get_asgi_application()
wsgi_application = get_wsgi_application()
