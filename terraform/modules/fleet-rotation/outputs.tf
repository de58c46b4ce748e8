output "command_document_name" {
  description = "Name of the command document every host runs (schema 2.2, aws:runShellScript, as root)."
  value       = try(aws_ssm_document.flush.name, null)
}

output "command_document_arn" {
  description = "ARN of the command document."
  value       = try(aws_ssm_document.flush.arn, null)
}

output "command_document_content" {
  description = "The command document (JSON): its parameters' allowedPattern and the script."
  value       = try(aws_ssm_document.flush.content, null)
}

output "runbook_name" {
  description = "Name of the Automation runbook that applies max_concurrency and max_errors, or null with dispatch = \"run_command\"."
  value       = try(aws_ssm_document.rollout[0].name, null)
}

output "rule_names" {
  description = "The EventBridge rules, by event kind (sm-api, sm-rotation, ssm, kms, kmskeys)."
  value       = try({ for k, r in aws_cloudwatch_event_rule.this : k => r.name }, {})
}

output "rule_arns" {
  description = "The EventBridge rule ARNs, by event kind."
  value       = try({ for k, r in aws_cloudwatch_event_rule.this : k => r.arn }, {})
}

output "events_role_arn" {
  description = "The role EventBridge assumes to start the flush."
  value       = try(aws_iam_role.events.arn, null)
}

output "automation_role_arn" {
  description = "The role the runbook runs as (sends the command), or null with dispatch = \"run_command\"."
  value       = try(aws_iam_role.automation[0].arn, null)
}

output "custom_event" {
  description = "What a kmskeys Flush Request looks like to PutEvents: its Source and DetailType; Detail is {\"name\": NAME, \"prefix\": PREFIX}."
  value       = try({ source = local.custom_event_source, detail_type = local.custom_event_detail_type }, null)
}

output "rate_controls" {
  description = "MaxConcurrency and MaxErrors as SSM applies them: the runbook's values, or SendCommand's defaults (50, 0) with dispatch = \"run_command\"."
  value = try(
    local.automation
    ? { max_concurrency = coalesce(var.max_concurrency, "10%"), max_errors = coalesce(var.max_errors, "10%"), applied_by = "runbook" }
    : { max_concurrency = "50", max_errors = "0", applied_by = "SendCommand defaults" },
    null,
  )
}
