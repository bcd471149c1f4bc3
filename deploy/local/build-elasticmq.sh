#!/usr/bin/env bash
# Resolves the ElasticMQ $ELASTICMQ_VERSION server (SQS-compatible) and its runtime jars from
# Maven Central into a version-keyed cache directory; it runs on the machine's Java 17.
source "$(dirname "$0")/common.sh"

if [[ -f "$ELASTICMQ_HOME/.complete" ]]; then log "elasticmq $ELASTICMQ_VERSION cached in $ELASTICMQ_HOME"; exit 0; fi
buildlog="$JOBRUNNER_CACHE/elasticmq-$ELASTICMQ_VERSION.build.log"
mkdir -p "$ELASTICMQ_HOME/libs"
start=$SECONDS
mvn -B -q -f "$(dirname "$0")/elasticmq/pom.xml" \
  -Dmaven.repo.local="$JOBRUNNER_CACHE/m2" -Delasticmq.version="$ELASTICMQ_VERSION" \
  dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$ELASTICMQ_HOME/libs" \
  >>"$buildlog" 2>&1 || die "mvn dependency:copy-dependencies (org.elasticmq:elasticmq-server_2.13:$ELASTICMQ_VERSION)" "$buildlog"
touch "$ELASTICMQ_HOME/.complete"
log "elasticmq $ELASTICMQ_VERSION resolved in $((SECONDS - start))s into $ELASTICMQ_HOME"
