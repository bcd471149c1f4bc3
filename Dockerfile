# The dispatcher and operator image: a wheel built in one stage, installed into a clean
# slim runtime that runs as an unprivileged user.
#
# PYTHON_IMAGE: any image with Python >= 3.11 and pip. The default is the official one;
# where no registry image can be pulled, deploy/local/build-image.sh makes one from
# Debian's packages (python3, python3-venv, python3-pip) and passes it here. pip is run as
# `python3 -m pip`, and PIP_BREAK_SYSTEM_PACKAGES lets it install into such a Debian
# Python (PEP 668); it changes nothing on the official image.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /src
RUN python3 -m pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY jobrunner ./jobrunner
RUN python3 -m build --wheel --outdir /dist

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    JOBRUNNER_TELEMETRY__HTTP_PORT=8080 JOBRUNNER_TELEMETRY__HTTP_HOST=0.0.0.0
RUN groupadd --system --gid 10001 jobrunner \
 && useradd --system --uid 10001 --gid jobrunner --home-dir /home/jobrunner --create-home jobrunner
COPY --from=build /dist/*.whl /tmp/
RUN python3 -m pip install --no-cache-dir /tmp/*.whl && rm -f /tmp/*.whl
COPY job_templates /etc/jobrunner/job_templates
USER 10001:10001
# Templates named in a manifest are looked up in ./job_templates too.
WORKDIR /etc/jobrunner
EXPOSE 8080
ENTRYPOINT ["jobrunner"]
# A dispatcher for the ScaledJobs of a mounted manifest; the Helm chart runs `operator`.
CMD ["run", "-f", "/etc/jobrunner/scaledjob.yaml"]
