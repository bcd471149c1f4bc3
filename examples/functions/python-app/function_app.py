"""A Python v2 function app: thumbnails are rendered one queue message at a time, each
in a Job of its own under jobrunner (long renders are never cut by a scale-down)."""

import json
import logging
import time

import azure.functions as func

app = func.FunctionApp()


@app.function_name("RenderThumbnail")
@app.queue_trigger(arg_name="msg", queue_name="thumbnails", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="done", queue_name="thumbnails-done", connection="AzureWebJobsStorage")
def render_thumbnail(msg: func.QueueMessage, done: func.Out[str]) -> None:
    request = msg.get_json()
    logging.warning(
        "rendering %s (message %s, dequeue %s)", request["image"], msg.id, msg.dequeue_count
    )
    print(f"rendering {request['image']} (message {msg.id})", flush=True)
    if request.get("corrupt"):
        raise ValueError(f"{request['image']} is not a valid image")
    time.sleep(float(request.get("seconds", 0)))
    done.set(json.dumps({"image": request["image"], "thumbnail": request["image"] + ".thumb.png"}))


@app.route(route="health")
def health(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("ok")
