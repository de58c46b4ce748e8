output "role_arn" {
  description = "ARN of the host role: a decryptor principal of the kms-key module."
  value       = try(aws_iam_role.this.arn, null)
}

output "role_name" {
  description = "Name of the host role."
  value       = try(aws_iam_role.this.name, null)
}

output "instance_profile_arn" {
  description = "ARN of the instance profile, for hosts not started from the launch template."
  value       = try(aws_iam_instance_profile.this.arn, null)
}

output "instance_profile_name" {
  description = "Name of the instance profile."
  value       = try(aws_iam_instance_profile.this.name, null)
}

output "launch_template_id" {
  description = "ID of the launch template, or null when it is not created."
  value       = try(aws_launch_template.this[0].id, null)
}

output "launch_template_latest_version" {
  description = "Latest version of the launch template, or null when it is not created."
  value       = try(aws_launch_template.this[0].latest_version, null)
}

output "user_data" {
  description = "The cloud-init user data (plain text), for hosts started another way."
  value       = try(local.user_data, null)
}

output "policy_json" {
  description = "The role's KMS permissions policy (JSON)."
  value       = try(data.aws_iam_policy_document.kms.json, null)
}

output "wheel_policy_json" {
  description = "The role's s3:GetObject policy for an s3:// kmskeys_wheel (JSON), or null."
  value       = try(data.aws_iam_policy_document.wheel[0].json, null)
}

output "secret_arn_patterns" {
  description = "The secret ARN patterns the hosts may read (GetSecretValue and the KMS encryption context SecretARN)."
  value       = try(local.secret_arns, [])
}

output "parameter_arn_patterns" {
  description = "The parameter ARN patterns the hosts may read (GetParameter and the KMS encryption context PARAMETER_ARN)."
  value       = try(local.parameter_arns, [])
}

output "sources_policy_json" {
  description = "The role's Secrets Manager and Parameter Store policy (JSON), or null when it has none."
  value       = try(data.aws_iam_policy_document.sources[0].json, null)
}

output "ssm_agent_policy_json" {
  description = "The role's SSM Agent policy (JSON), or null without enable_ssm_agent."
  value       = try(data.aws_iam_policy_document.ssm_agent[0].json, null)
}
