# The dispatcher image: a wheel built in one stage, installed into a clean slim runtime
# that runs as an unprivileged user.
FROM python:3.12-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY jobrunner ./jobrunner
RUN python -m build --wheel --outdir /dist

FROM python:3.12-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 jobrunner \
 && useradd --system --uid 10001 --gid jobrunner --home-dir /home/jobrunner --create-home jobrunner
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm -f /tmp/*.whl
COPY job_templates /etc/jobrunner/job_templates
USER 10001:10001
WORKDIR /home/jobrunner
ENTRYPOINT ["jobrunner"]
CMD ["run", "-f", "/etc/jobrunner/scaledjob.yaml"]
