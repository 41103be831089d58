"""JSON schemas with a prompt each, for the real-model structured-output suite and the benchmark."""

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}

SUITE = [
    ("Describe a person.", PERSON),
    ("Give a city and its country.", {
        "type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}),
    ("Pick a primary color.", {"type": "object", "properties": {"color": {"enum": ["red", "yellow", "blue"]}},
                               "required": ["color"]}),
    ("Rate this movie from 1 to 5.", {"type": "object", "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "review": {"type": "string", "maxLength": 80}},
        "required": ["stars"]}),
    ("A temperature reading in Celsius.", {"type": "object", "properties": {
        "celsius": {"type": "number", "minimum": -90, "maximum": 60}}, "required": ["celsius"]}),
    ("List three fruits.", {"type": "object", "properties": {"fruits": {
        "type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 3}},
        "required": ["fruits"]}),
    ("A book with its author.", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 30},
                                                    "last": {"type": "string", "maxLength": 30}},
                   "required": ["first", "last"], "additionalProperties": False},
        "year": {"type": "integer", "minimum": 1400, "maximum": 2030}},
        "required": ["title", "author", "year"]}),
    ("Is the sky blue?", {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
    ("A shopping list with quantities.", {"type": "object", "properties": {"items": {
        "type": "array", "maxItems": 4, "minItems": 1, "items": {
            "type": "object", "properties": {"item": {"type": "string", "maxLength": 20},
                                             "quantity": {"type": "integer", "minimum": 1, "maximum": 12}},
            "required": ["item", "quantity"], "additionalProperties": False}}}, "required": ["items"]}),
    ("An ID or a name for a user.", {"type": "object", "properties": {
        "user": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "maxLength": 30}]}},
        "required": ["user"]}),
    ("A point in 2D.", {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"], "additionalProperties": False}),
    ("A US phone number.", {"type": "object", "properties": {
        "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{3}-[0-9]{4}$"}}, "required": ["phone"]}),
    ("Today's weather.", {"type": "object", "properties": {
        "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]},
        "high": {"type": "integer", "minimum": -50, "maximum": 55},
        "low": {"type": "integer", "minimum": -60, "maximum": 50}, "wind_kmh": {"type": "number", "minimum": 0}},
        "required": ["condition", "high", "low"]}),
    ("A product for sale.", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "price": {"type": "number", "exclusiveMinimum": 0,
                                                               "maximum": 10000},
        "currency": {"const": "EUR"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 15},
                                               "maxItems": 3}},
        "required": ["name", "price", "currency"]}),
    ("A matrix of small numbers.", {"type": "object", "properties": {"rows": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                      "maximum": 9}}}}, "required": ["rows"]}),
    ("An event with a date.", {"type": "object", "properties": {
        "event": {"type": "string", "maxLength": 40}, "date": {"type": "string", "format": "date"}},
        "required": ["event", "date"]}),
    ("A contact card.", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "email": {"type": "string", "format": "email", "maxLength": 40},
        "nickname": {"type": ["string", "null"], "maxLength": 20}}, "required": ["name", "email", "nickname"]}),
    ("A shape.", {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}},
         "required": ["kind", "radius"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}},
         "required": ["kind", "side"], "additionalProperties": False}]}}, "required": ["shape"]}),
    ("A family of two people.", {"$defs": {"person": PERSON}, "type": "object", "properties": {
        "parent": {"$ref": "#/$defs/person"}, "child": {"$ref": "#/$defs/person"}},
        "required": ["parent", "child"]}),
    ("A task list.", {"type": "object", "properties": {"tasks": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 30},
                                         "done": {"type": "boolean"},
                                         "priority": {"enum": ["low", "medium", "high"]}},
        "required": ["title", "done", "priority"], "additionalProperties": False}}}, "required": ["tasks"]}),
    ("Translate 'hello' into French.", {"type": "object", "properties": {
        "source": {"const": "hello"}, "french": {"type": "string", "minLength": 1, "maxLength": 20}},
        "required": ["source", "french"]}),
    ("A server configuration.", {"type": "object", "properties": {
        "host": {"type": "string", "maxLength": 30}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "tls": {"type": "boolean"}, "options": {"type": "object", "properties": {
            "timeout_s": {"type": "number", "minimum": 0, "maximum": 600},
            "retries": {"type": "integer", "minimum": 0, "maximum": 5}}, "additionalProperties": False}},
        "required": ["host", "port", "tls"], "additionalProperties": False}),
    ("Three random numbers between 0 and 1.", {"type": "array", "items": {"type": "number", "minimum": 0,
                                                                          "maximum": 1},
                                               "minItems": 3, "maxItems": 3}),
    ("Say yes or no.", {"enum": ["yes", "no"]}),
]
