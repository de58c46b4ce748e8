output "secret_arn" {
  description = "The example's secret: sm:NAME/db on the hosts."
  value       = try(aws_secretsmanager_secret.db.arn, null)
}

output "secret_name" {
  description = "Name of the example's secret."
  value       = try(aws_secretsmanager_secret.db.name, null)
}

output "parameter_name" {
  description = "The example's SecureString parameter: ssm:NAME/db/password on the hosts."
  value       = try(aws_ssm_parameter.db_password.name, null)
}

output "secrets_key_arn" {
  description = "The KMS key that encrypts the secret and the parameter."
  value       = try(aws_kms_key.secrets.arn, null)
}

output "kmskeys_key_arn" {
  description = "The kmskeys key for blobs."
  value       = try(module.kms_key.key_arn, null)
}

output "host_role_arn" {
  description = "The hosts' role."
  value       = try(module.hosts.role_arn, null)
}

output "command_document_name" {
  description = "The flush document every tagged host runs."
  value       = try(module.rotation.command_document_name, null)
}

output "runbook_name" {
  description = "The runbook that sends the flush with the rate controls."
  value       = try(module.rotation.runbook_name, null)
}

output "rule_names" {
  description = "The EventBridge rules, by event kind."
  value       = try(module.rotation.rule_names, {})
}

output "custom_event" {
  description = "Source and DetailType of a kmskeys Flush Request."
  value       = try(module.rotation.custom_event, null)
}

output "resolver_config" {
  description = "The resolver settings that serve the example's secret and parameter on the hosts (/etc/kmskeys/resolver.toml): sm:NAME/db, ssm:NAME/db/password, and NAME.kms blobs. By ARN, which pins the account and the Region."
  value = try(join("\n", [
    format("region = %q", var.region),
    format("key_arns = [%q]", module.kms_key.key_arn),
    format("sm_secrets = [%q]", aws_secretsmanager_secret.db.arn),
    format("ssm_parameters = [%q]", aws_ssm_parameter.db_password.arn),
    "",
  ]), null)
}
