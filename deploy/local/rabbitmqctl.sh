#!/usr/bin/env bash
# rabbitmqctl for the stack's RabbitMQ node (same environment and cookie as stack-up.sh).
source "$(dirname "$0")/common.sh"
export RABBITMQ_NODENAME="jobrunner@localhost" RABBITMQ_USE_LONGNAME=false
exec /usr/lib/rabbitmq/bin/rabbitmqctl -n jobrunner@localhost "$@"
