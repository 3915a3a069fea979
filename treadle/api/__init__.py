"""HTTP front ends (thin: decode → call the service → encode): the Tinker protocol and the OpenAI API."""
