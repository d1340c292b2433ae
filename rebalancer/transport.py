"""azure-core's HTTP transport on urllib3 directly, for every client of the app (Compute reads
and writes, Table Storage, the follow-up queue) but the Event Grid notifier's: azure-eventgrid's
basic-tier `EventGridPublisherClient` (4.2x) does not pass its constructor's options on, a
transport included, so it sends through azure-core's default.

azure-core's own `RequestsTransport` sends through requests, which sends through urllib3: about
1.1 ms of CPU a request goes to requests (sessions, hooks, cookies, adapters, its response
object) and azure-core's wrapping of it, before urllib3 and http.client do the actual work;
an audit sends a thousand GETs a tick. Importing requests (with charset_normalizer and
http.cookiejar) is also a tenth of a worker's first tick. This transport keeps what requests
gave us and nothing else:

- a `urllib3.PoolManager` for HTTPS and one for HTTP (a `ProxyManager` per proxy), `pool`
  connections kept per host, urllib3's own retries and redirects off (the pipeline's
  policies retry and redirect);
- one TLS context per CA bundle for the whole process (`verified_context`): the bundle
  (certifi's, as requests', or the one given) is loaded once, with the first HTTPS request of
  any client, not once per connection as urllib3 does when handed the bundle's path, nor once
  per client (Compute, Table Storage, the follow-up queue); a client that only
  speaks HTTP (to Azurite) never loads it;
- the environment's proxy settings (HTTPS_PROXY, HTTP_PROXY, NO_PROXY, with requests' CIDR
  ranges) and CA bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) read once, at construction;
- azure-core's exceptions, as `RequestsTransport` raises them: `ServiceRequestError` when the
  request could not be sent (connection refused, TLS refused, proxy refused),
  `ServiceResponseError` when the answer could not be read (reset, read timeout), which the
  retry policy and the app's error classification depend on.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import urllib3
from azure.core.exceptions import (
    DecodeError,
    IncompleteReadError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import HttpResponse, HttpTransport
from azure.core.rest._http_response_impl import HttpResponseImpl
from azure.core.utils import case_insensitive_dict
from urllib3 import exceptions as url_errors
from urllib3.util.retry import Retry
from urllib3.util.ssl_ import create_urllib3_context

NO_RETRIES = Retry(total=False, redirect=False, raise_on_status=False)
"""urllib3's own retries off: the pipeline's retry policy retries (azure-core's setting)."""

DEFAULT_HEADERS = {"Accept-Encoding": "gzip, deflate", "Accept": "*/*"}
"""What requests added to every request, which ARM's and Storage's answers were seen with."""


def environ_ca_bundle() -> str | None:
    """The CA bundle the environment names, as requests read it: `REQUESTS_CA_BUNDLE`, else
    `CURL_CA_BUNDLE` (None: certifi's)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def environ_proxies() -> dict[str, str]:
    """The proxy settings of the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY...), keyed by
    scheme as `urllib.request.getproxies_environment` reads them ("no" for NO_PROXY)."""
    return urllib.request.getproxies_environment()


def bypasses_proxy(netloc: str, proxies: Mapping[str, str]) -> bool:
    """Whether NO_PROXY (`proxies["no"]`) sends requests to `netloc` straight to the host:
    as urllib reads it (host names, domain suffixes, `*`) and, as requests did, an IP address
    inside a CIDR range it lists (`10.0.0.0/8`, `fd00::/8`), which urllib does not read."""
    if urllib.request.proxy_bypass_environment(netloc, proxies):
        return True
    try:
        address = ipaddress.ip_address(urlsplit(f"//{netloc}").hostname or "")
    except ValueError:  # a host name, which urllib has already checked
        return False
    for entry in proxies.get("no", "").split(","):
        try:
            if "/" in entry and address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:  # not a network: urllib has already checked it as a name
            continue
    return False


class Urllib3Transport(HttpTransport):
    """azure-core's `HttpTransport` on one urllib3 pool manager; thread-safe.

    `ca_bundle`: the CA bundle HTTPS servers are verified against (None: the environment's,
    `environ_ca_bundle()`, else certifi's, as requests). `proxies`: as `environ_proxies()`
    returns them (None: read from the environment now). Timeouts in seconds, per request as
    azure-core's `connection_timeout` and `read_timeout` options, or for all requests here.
    """

    def __init__(
        self,
        *,
        pool: int = 10,
        ca_bundle: str | None = None,
        connection_timeout: float = 300,
        read_timeout: float = 300,
        proxies: Mapping[str, str] | None = None,
        data_block_size: int = 4096,
    ) -> None:
        self.pool = pool
        self.ca_bundle = ca_bundle or environ_ca_bundle()
        self.connection_timeout = connection_timeout
        self.read_timeout = read_timeout
        self.block_size = data_block_size
        self.proxies = dict(environ_proxies() if proxies is None else proxies)
        self._lock = threading.Lock()
        self._managers: dict[tuple[Any, ...], urllib3.PoolManager] = {}
        self._routes: dict[str, str | None] = {}
        self._pools: dict[tuple[int, str], Any] = {}
        self._timeouts: dict[tuple[Any, Any], urllib3.Timeout] = {}

    def __enter__(self) -> Urllib3Transport:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Nothing to open: pools are made with the first request to each host."""

    def close(self) -> None:
        """Close every pooled connection; a later request opens new ones."""
        with self._lock:
            managers, self._managers = self._managers, {}
            self._pools = {}
        for manager in managers.values():
            manager.clear()

    def proxy_for(self, url: str) -> str | None:
        """The proxy a request to `url` goes through (None: straight to the host): as requests,
        the scheme's proxy (or ALL_PROXY's) unless NO_PROXY names the host
        (`bypasses_proxy`)."""
        return self._route(_split(url), url)

    def _route(self, split: tuple[str, str] | None, url: str) -> str | None:
        origin = split[0] if split else "{}://{}".format(*urlsplit(url))  # scheme, netloc
        if origin not in self._routes:
            parts = urlsplit(url)
            proxy = self.proxies.get(parts.scheme) or self.proxies.get("all")
            if proxy and bypasses_proxy(parts.netloc, self.proxies):
                proxy = None
            self._routes[origin] = proxy
        return self._routes[origin]

    def send(self, request: Any, **kwargs: Any) -> Any:
        """Send `request` (azure-core's `rest.HttpRequest` or its legacy one) and answer the
        matching response type; the body is read before returning unless `stream=True`."""
        stream = bool(kwargs.get("stream", False))
        verify = kwargs.get("connection_verify", True)
        cert = kwargs.get("connection_cert")
        timeout = self._timeout(
            kwargs.get("connection_timeout", self.connection_timeout),
            kwargs.get("read_timeout", self.read_timeout),
        )
        url = request.url
        split = _split(url)
        proxies = kwargs.get("proxies")
        if proxies:
            scheme = urlsplit(url).scheme
            proxy = proxies.get(scheme) or proxies.get("all")
        else:
            proxy = self._route(split, url)
        headers = request.headers
        missing = [name for name in DEFAULT_HEADERS if name not in headers]
        if missing:
            headers = {**{name: DEFAULT_HEADERS[name] for name in missing}, **headers}
        options = {
            "body": _body(request, headers),
            "headers": headers,
            "redirect": False,
            "retries": NO_RETRIES,
            "timeout": timeout,
            "preload_content": not stream,
        }
        try:
            manager = self._manager(url, proxy, verify, cert)
            if proxy or split is None:
                raw = manager.urlopen(request.method, url, **options)
            else:
                raw = self._pool(manager, split[0]).urlopen(
                    request.method, split[1], assert_same_host=False, **options
                )
        except url_errors.HTTPError as error:
            raise _azure_error(error, self.ca_bundle) from error
        if _is_rest(request):
            response: Any = Urllib3Response(
                request=request, internal_response=raw, block_size=self.block_size
            )
            if not stream:
                response._content = raw.data or b""
                response._set_read_checks()
            return response
        return LegacyUrllib3Response(request, raw, self.block_size)

    def _pool(self, manager: urllib3.PoolManager, origin: str) -> Any:
        """The manager's connection pool for `origin`, looked up once: what
        `PoolManager.urlopen` finds again for every request by parsing the whole URL. Kept
        here, it stays open when the manager drops it for its eleventh host (urllib3 closes
        no pool it evicts: it lets it go)."""
        key = (id(manager), origin)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = manager.connection_from_url(origin)
        return pool

    def _timeout(self, connect: Any, read: Any) -> urllib3.Timeout:
        if isinstance(connect, tuple):
            connect, read = connect
        key = (connect, read)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = urllib3.Timeout(connect=connect, read=read)
        return timeout

    def _manager(self, url: str, proxy: str | None, verify: Any, cert: Any) -> urllib3.PoolManager:
        shared = not cert and (verify in (True, None) or verify == self.ca_bundle)
        tls = shared and url[:6].lower() == "https:"
        key = (proxy, True if shared else verify, cert, tls)
        manager = self._managers.get(key)
        if manager is None:
            with self._lock:
                manager = self._managers.get(key)
                if manager is None:
                    manager = self._new_manager(proxy, shared, verify, cert, tls)
                    self._managers[key] = manager
        return manager

    def _new_manager(
        self, proxy: str | None, shared: bool, verify: Any, cert: Any, tls: bool
    ) -> urllib3.PoolManager:
        """A manager for the shared bundle's HTTPS (`tls`) or plain HTTP (`shared`: no bundle
        loaded), or for a request's own `verify` and `cert`."""
        options: dict[str, Any] = {"maxsize": self.pool, "retries": NO_RETRIES}
        if tls:
            options["ssl_context"] = verified_context(self.ca_bundle or _certifi())
        elif not shared and verify is False:
            options["cert_reqs"] = "CERT_NONE"
        elif not shared:  # another bundle than the shared one: urllib3 loads it per connection
            options["ca_certs"] = verify if isinstance(verify, str) else _certifi()
        if cert:
            cert_file, key_file = cert if isinstance(cert, tuple) else (cert, None)
            options.update(cert_file=cert_file, key_file=key_file)
        if proxy:
            return urllib3.ProxyManager(proxy, **options)
        return urllib3.PoolManager(**options)


def _split(url: str) -> tuple[str, str] | None:
    """(`scheme://host[:port]`, `/path?query`) of an absolute URL with a path; None for any
    other (urllib3 parses those itself)."""
    start = url.find("://")
    slash = url.find("/", start + 3) if start > 0 else -1
    if slash < 0:
        return None
    origin = url[:slash]
    if "?" in origin or "#" in origin or "@" in origin:
        return None
    return origin, url[slash:].partition("#")[0]


_VERIFIED_LOCK = threading.Lock()


def verified_context(ca_bundle: str) -> Any:
    """The process's TLS context that verifies servers against `ca_bundle` (a PEM file),
    loaded once: every client of the app with that bundle connects with it, so a new worker
    parses certifi's bundle once (about 20 ms of CPU), not once per client. Certificates are
    required and host names checked, as urllib3's default context does."""
    with _VERIFIED_LOCK:
        return _verified(ca_bundle)


@functools.lru_cache(maxsize=8)
def _verified(ca_bundle: str) -> Any:
    context = create_urllib3_context()
    context.load_verify_locations(ca_bundle)
    return context


def _certifi() -> str:
    import certifi

    return certifi.where()


def _is_rest(request: Any) -> bool:
    """azure-core's own test (`pipeline._tools.is_rest`): a rest request has `content`."""
    return hasattr(request, "content")


def _body(request: Any, headers: Any) -> Any:
    files = getattr(request, "files", None)
    if files:  # a multipart form, as requests encoded it
        body, headers["Content-Type"] = urllib3.encode_multipart_formdata(files)
        return body
    data = request.data
    if isinstance(data, Mapping):  # a form, as requests encoded it
        if "Content-Type" not in headers:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        return urlencode(data, doseq=True)
    return data


def _azure_error(error: Exception, ca_bundle: str | None = None) -> Exception:
    """azure-core's exception for a urllib3 failure, as `RequestsTransport` maps requests'.
    A certificate the bundle does not trust says which bundle and what to do: that does not
    pass with a retry."""
    if isinstance(error, url_errors.NewConnectionError):  # refused, unknown host
        return ServiceRequestError(error, error=error)
    if isinstance(error, url_errors.ConnectTimeoutError):
        return ServiceRequestTimeoutError(error, error=error)
    if isinstance(error, url_errors.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(error):
        bundle = ca_bundle or "certifi's (the default)"
        return ServiceRequestError(
            f"{error}: the server's certificate is not trusted by the CA bundle {bundle}; "
            "behind a proxy that inspects TLS, set REQUESTS_CA_BUNDLE to a bundle that also "
            "holds the proxy's CA",
            error=error,
        )
    if isinstance(error, url_errors.SSLError | url_errors.ProxyError):
        return ServiceRequestError(error, error=error)
    if isinstance(error, url_errors.ReadTimeoutError):
        return ServiceResponseTimeoutError(error, error=error)
    if isinstance(error, url_errors.ProtocolError) and "IncompleteRead" in str(error):
        return IncompleteReadError(error, error=error)
    if isinstance(error, url_errors.DecodeError):
        return DecodeError(error, error=error)
    return ServiceResponseError(error, error=error)


class StreamDownload:
    """A streamed body in `block_size` chunks, decompressed unless `decompress=False`, with
    azure-core's exceptions; the connection goes back to its pool once the body is read."""

    def __init__(self, pipeline: Any, response: Any, *, decompress: bool = True) -> None:
        self.pipeline = pipeline
        self.request = response.request
        self.response = response
        self._raw = response.internal_response
        self._chunks = self._raw.stream(response.block_size, decode_content=decompress)
        self.content_length = int(response.headers.get("Content-Length", 0))

    def __len__(self) -> int:
        return self.content_length

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._raw.release_conn()
            raise
        except url_errors.HTTPError as error:
            self._raw.close()
            raise _azure_error(error) from error
        if not chunk:
            self._raw.release_conn()
            raise StopIteration
        return chunk


class Urllib3Response(HttpResponseImpl):
    """azure-core's `rest.HttpResponse` over a `urllib3.HTTPResponse` (`internal_response`)."""

    def __init__(self, *, request: Any, internal_response: Any, block_size: int) -> None:
        headers = case_insensitive_dict(internal_response.headers)
        super().__init__(
            request=request,
            internal_response=internal_response,
            block_size=block_size,
            status_code=internal_response.status,
            reason=internal_response.reason,
            headers=headers,
            content_type=headers.get("Content-Type"),
            stream_download_generator=StreamDownload,
        )

    def _body(self) -> bytes:
        if self._content is None:
            self._content = self._internal_response.data
        return self._content


class LegacyUrllib3Response(HttpResponse):
    """azure-core's legacy `pipeline.transport.HttpResponse` (still sent by some clients)."""

    def __init__(self, request: Any, internal_response: Any, block_size: int) -> None:
        super().__init__(request, internal_response, block_size)
        self.status_code = internal_response.status
        self.headers = case_insensitive_dict(internal_response.headers)
        self.reason = internal_response.reason
        self.content_type = self.headers.get("Content-Type")

    def body(self) -> bytes:
        return self.internal_response.data

    def stream_download(self, pipeline: Any, **kwargs: Any) -> Iterator[bytes]:
        return StreamDownload(pipeline, self, **kwargs)
