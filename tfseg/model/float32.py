"""A trained model computing in float32, whatever policy it was trained under: what export and
evaluate run (a mixed_float16 model is slow and less exact on CPUs)."""

import keras


def _float32_config(node):
    """A model config with every mixed-precision dtype policy replaced by float32."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and str(node.get("config", {}).get("name", "")).startswith(
                "mixed_"):
            return {**node, "config": {**node["config"], "name": "float32"}}
        return {key: _float32_config(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_float32_config(value) for value in node]
    return node


def float32_model(model: keras.Model) -> keras.Model:
    """The same model computing in float32 (rebuilt from its config with float32 policies, same weights)."""
    config = model.get_config()
    cast = _float32_config(config)
    if cast == config:
        return model
    clone = model.__class__.from_config(cast)
    clone.set_weights(model.get_weights())
    return clone
