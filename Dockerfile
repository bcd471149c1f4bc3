# The dispatcher image: a wheel built in one stage, installed into a clean slim runtime
# that runs as an unprivileged user.
FROM python:3.12-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY jobrunner ./jobrunner
RUN python -m build --wheel --outdir /dist

FROM python:3.12-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    JOBRUNNER_TELEMETRY__HTTP_PORT=8080 JOBRUNNER_TELEMETRY__HTTP_HOST=0.0.0.0
RUN groupadd --system --gid 10001 jobrunner \
 && useradd --system --uid 10001 --gid jobrunner --home-dir /home/jobrunner --create-home jobrunner
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm -f /tmp/*.whl
COPY job_templates /etc/jobrunner/job_templates
USER 10001:10001
# Templates named in a manifest are looked up in ./job_templates too.
WORKDIR /etc/jobrunner
EXPOSE 8080
ENTRYPOINT ["jobrunner"]
CMD ["run", "-f", "/etc/jobrunner/scaledjob.yaml"]
