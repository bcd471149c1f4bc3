#!/usr/bin/env bash
# Resolves the Apache Kafka $KAFKA_VERSION broker and its runtime jars from Maven Central
# (the registries are the only source here) into a version-keyed cache directory.
source "$(dirname "$0")/common.sh"

if [[ -f "$KAFKA_HOME/.complete" ]]; then log "kafka $KAFKA_VERSION cached in $KAFKA_HOME"; exit 0; fi
buildlog="$JOBRUNNER_CACHE/kafka-$KAFKA_VERSION.build.log"
mkdir -p "$KAFKA_HOME/libs"
start=$SECONDS
mvn -B -q -f "$(dirname "$0")/kafka/pom.xml" \
  -Dmaven.repo.local="$JOBRUNNER_CACHE/m2" -Dkafka.version="$KAFKA_VERSION" \
  dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_HOME/libs" \
  >>"$buildlog" 2>&1 || die "mvn dependency:copy-dependencies (org.apache.kafka:kafka_2.13:$KAFKA_VERSION)" "$buildlog"
touch "$KAFKA_HOME/.complete"
log "kafka $KAFKA_VERSION resolved in $((SECONDS - start))s into $KAFKA_HOME"
