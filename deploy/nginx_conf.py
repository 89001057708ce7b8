"""nginx in front of N Streamlit replicas: ``python deploy/nginx_conf.py RUN_DIR LISTEN_PORT BACKEND_PORT...``.

Writes ``RUN_DIR/nginx.conf`` for a non-root nginx (pid, temp folders and logs under ``RUN_DIR``) listening on
``127.0.0.1:LISTEN_PORT``. Sticky sessions without nginx Plus: a browser without the ``qcore_replica``
cookie is hashed by its request id (so new visitors spread over the replicas, even all from one address) and
gets that id as the cookie; afterwards the cookie picks the same replica (``hash ... consistent``). Streamlit
needs both: its session lives in one replica's memory, and ``/_stcore/stream`` is a websocket, so the
``Upgrade``/``Connection`` headers are passed and idle websockets are kept for a day.
"""

import sys
from pathlib import Path

TEMPLATE = """\
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log {run}/nginx-access.log;
  client_body_temp_path {run}/nginx-tmp/body;
  proxy_temp_path {run}/nginx-tmp/proxy;
  fastcgi_temp_path {run}/nginx-tmp/fastcgi;
  uwsgi_temp_path {run}/nginx-tmp/uwsgi;
  scgi_temp_path {run}/nginx-tmp/scgi;
  map $cookie_qcore_replica $qcore_sticky {{ "" $request_id; default $cookie_qcore_replica; }}
  map $cookie_qcore_replica $qcore_new_cookie {{ "" "qcore_replica=$request_id; Path=/; HttpOnly; SameSite=Lax"; default ""; }}
  map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
  upstream streamlit {{
    hash $qcore_sticky consistent;
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 200m;  # Streamlit's own upload limit
    location / {{
      proxy_pass http://streamlit;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_buffering off;
      proxy_connect_timeout 5s;
      proxy_send_timeout 3600s;
      proxy_read_timeout 86400s;  # an idle websocket (a page open during a lesson) stays up
      add_header Set-Cookie $qcore_new_cookie always;  # empty (not sent) once the browser has the cookie
    }}
  }}
}}
"""


def render(run: Path, port: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=0;" for p in backends)
    return TEMPLATE.format(run=Path(run).resolve(), port=port, servers=servers)


def write(run: Path, port: int, backends: list[int]) -> Path:
    run = Path(run)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
    path = run / "nginx.conf"
    path.write_text(render(run, port, backends))
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]))
