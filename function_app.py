"""The Function App (Python v2 programming model): registers the blueprints in ``functions/``.

Kept light on purpose: Flex Consumption gives an instance 30 s to start, so the SDKs are imported
by the engine on first use, not here.
"""

import azure.functions as func

from functions.consent_http import bp as consent_bp
from functions.drain_queue import bp as drain_queue_bp
from functions.drain_timer import bp as drain_timer_bp
from functions.status_http import bp as status_bp

app = func.FunctionApp()
app.register_functions(drain_timer_bp)
app.register_functions(drain_queue_bp)
app.register_functions(status_bp)
app.register_functions(consent_bp)
