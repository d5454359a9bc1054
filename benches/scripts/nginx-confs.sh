# shellcheck shell=bash
# The nginx side of the proxy benchmarks, shared by proxy-vs-nginx.sh and proxy-ab.sh: the
# upstream (one worker answering "hello" at /, and 10 KiB and 1 MiB bodies at /10k and /1m, for
# the copy costs) and nginx as a reverse proxy in front of it.
#   write_nginx_confs DIR UPSTREAM_PORT PROXY_PORT   → DIR/up.conf, DIR/rp.conf
write_nginx_confs() {
local W=$1 UP=$2 NGX=$3
mkdir -p "$W/up"
head -c 10240 /dev/zero | tr '\0' 'a' > "$W/up/body-10k"
head -c 1048576 /dev/zero | tr '\0' 'a' > "$W/up/body-1m"
# nginx's workers run as an unprivileged user: they must reach the bodies (mktemp makes 0700).
chmod 0755 "$W" "$W/up"; chmod 0644 "$W/up/body-10k" "$W/up/body-1m"
cat > "$W/up.conf" <<CONF
worker_processes 1; pid up/nginx.pid; error_log up/error.log warn; daemon on;
events { worker_connections 4096; multi_accept on; }
http { access_log off; keepalive_timeout 75s; keepalive_requests 1000000; client_body_temp_path up/tmp;
  server { listen 127.0.0.1:$UP reuseport backlog=4096;
    location = /10k { default_type text/plain; alias $W/up/body-10k; }
    location = /1m { default_type text/plain; alias $W/up/body-1m; }
    location / { default_type text/plain; return 200 "hello\n"; } } }
CONF
write_nginx_proxy_conf "$W" rp "$UP" "listen 127.0.0.1:$NGX reuseport backlog=4096;"
}

# nginx as a reverse proxy to UPSTREAM_PORT, the same for every benchmark; LISTEN_LINE says how
# it listens (plain, or TLS + HTTP/2 with its certificate lines). NGINX_PROXY_BUFFERING=off
# streams answers instead of buffering them (large bodies otherwise spill to temporary files);
# NGINX_WORKERS sets its worker processes (1 by default).
#   write_nginx_proxy_conf DIR NAME UPSTREAM_PORT LISTEN_LINE [WORKER_CONNECTIONS]
#     → DIR/NAME.conf (pid in DIR/NAME/)
write_nginx_proxy_conf() {
local W=$1 NAME=$2 UP=$3 LISTEN=$4 CONNS=${5:-4096}
cat > "$W/$NAME.conf" <<CONF
worker_processes ${NGINX_WORKERS:-1}; pid $NAME/nginx.pid; error_log $NAME/error.log warn; daemon on;
events { worker_connections $CONNS; multi_accept on; }
http { access_log off; keepalive_timeout 75s; keepalive_requests 1000000;
  client_body_temp_path $NAME/tmp; proxy_temp_path $NAME/tmp;
  upstream hello_up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 1000000; keepalive_timeout 60s; }
  server { $LISTEN
    location / { proxy_pass http://hello_up; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$host; proxy_buffering ${NGINX_PROXY_BUFFERING:-on};
      add_header X-Request-Id \$request_id always; } } }
CONF
}
